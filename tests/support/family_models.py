"""One tiny random model per layout option of MPT, GPT-NeoX, Falcon, Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3,
with transformers' logits and the numpy references' streams (shared by the family, chunk-reference and generation
tests)."""

import functools

import numpy as np

from streamjax.files.weights import convert_tensors
from streamjax.model import families
from support.models import hf_logits, hf_state_dict, randomize_weights
from support.reference import llama_stream_logits
from support.reference_families import falcon_stream_logits, gpt_neox_stream_logits, mpt_stream_logits

VOCAB = 97


TOKENS = np.random.RandomState(0).randint(0, VOCAB, size=(2, 40))


STREAM_TOKENS = np.random.RandomState(1).randint(0, VOCAB, size=(1, 150))


LLAMA_STYLE_BASE = {
    "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 6,
    "num_key_value_heads": 2, "max_position_embeddings": 512,
}  # fmt: skip


HF_CLASSES = {  # family -> (config class, model class, tiny base settings)
    "mpt": ("MptConfig", "MptForCausalLM", {"d_model": 48, "n_heads": 6, "n_layers": 2, "max_seq_len": 256}),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 96},
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {"hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 2, "ffn_hidden_size": 96},
    ),
    **{
        family: (f"{prefix}Config", f"{prefix}ForCausalLM", LLAMA_STYLE_BASE)
        for family, prefix in (("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("mistral", "Mistral"))
    },
    # Gemma in eager attention (transformers' SDPA path does not soft-cap attention scores).
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**LLAMA_STYLE_BASE, "attn_implementation": "eager"}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**LLAMA_STYLE_BASE, "attn_implementation": "eager"}),
}


VARIANTS = {  # name -> (family, settings); together they cover every layout option of the three families
    "mpt_clip_qkv": ("mpt", {"attn_config": {"clip_qkv": 0.6}}),
    "mpt_biases_untied_softmax_scale": (
        "mpt",
        {"no_bias": False, "tie_word_embeddings": False, "attn_config": {"softmax_scale": 0.2}},
    ),
    "neox_quarter_rotary_parallel": ("gpt_neox", {"rotary_pct": 0.25, "use_parallel_residual": True}),
    "neox_full_rotary_sequential_tied": (
        "gpt_neox",
        {
            "rotary_pct": 1.0,
            "use_parallel_residual": False,
            "attention_bias": False,
            "tie_word_embeddings": True,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
    ),
    "falcon_new_arch_gqa_rope": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon_new_arch_one_norm_alibi_bias": (
        "falcon",
        {
            "new_decoder_architecture": True,
            "num_kv_heads": 4,
            "num_ln_in_parallel_attn": 1,
            "alibi": True,
            "bias": True,
            "tie_word_embeddings": False,
        },
    ),
    "falcon_multi_query_parallel_rope": (
        "falcon",
        {"multi_query": True, "parallel_attn": True, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
    ),
    "falcon_rw_alibi_sequential_bias": (
        "falcon",
        {"multi_query": False, "parallel_attn": False, "alibi": True, "bias": True},
    ),
}


LLAMA_STYLE_VARIANTS = {  # Qwen2, Qwen3 and Mistral (tests/model/test_qwen_mistral.py): GQA/MQA, tied and untied
    "qwen2_gqa_untied": (
        "qwen2",
        {"tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 300.0}},
    ),
    # The sliding-window fields are set, but no layer slides: both layers are below max_window_layers.
    "qwen2_mqa_tied_no_layer_slides": (
        "qwen2",
        {
            "num_key_value_heads": 1,
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 2,
        },
    ),
    "qwen3_gqa_untied_wide_head": ("qwen3", {"head_dim": 16, "tie_word_embeddings": False}),
    "qwen3_tied_attention_bias_linear_rope": (
        "qwen3",
        {
            "num_key_value_heads": 3,
            "head_dim": 8,
            "attention_bias": True,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
        },
    ),
    "mistral_gqa_untied_no_window": ("mistral", {"sliding_window": None, "tie_word_embeddings": False}),
    "mistral_tied_window_at_context": ("mistral", {"sliding_window": 512, "head_dim": 12, "tie_word_embeddings": True}),
}

# Qwen2 and Mistral whose windows of 8 slide inside the tests' 40 tokens (tests/model/test_qwen_mistral.py).
SLIDING_LLAMA_STYLE_VARIANTS = {
    "qwen2_layer_1_slides_window_8": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1, "tie_word_embeddings": False},
    ),
    "mistral_window_8": ("mistral", {"sliding_window": 8, "tie_word_embeddings": False}),
}

# Gemma 2 and Gemma 3 (tests/model/test_gemma.py). Every soft-cap is small enough that tanh bends the
# scores and logits it caps; query_pre_attn_scalar differs from head_dim; the "_wide_window" variants' window
# (64) covers the tests' 40 tokens, the "_window_8" ones limit their sliding layers inside them.
_GEMMA3_ROPE_PER_TYPE = {
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
}
_GEMMA3_ONE_ROPE = {layer_type: {"rope_type": "default", "rope_theta": 300.0} for layer_type in _GEMMA3_ROPE_PER_TYPE}
_GEMMA3_LAYERS = {"num_hidden_layers": 4, "sliding_window_pattern": 3}  # layers 0, 1 and 3 slide, 2 is full
GEMMA_VARIANTS = {
    "gemma2_gqa_tied_wide_window": (
        "gemma2",
        {
            "head_dim": 8, "query_pre_attn_scalar": 12, "sliding_window": 64, "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
        },
    ),
    "gemma2_mqa_untied_bias_window_8": (
        "gemma2",
        {
            "num_hidden_layers": 3, "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 20,
            "sliding_window": 8, "attn_logit_softcapping": 2.5, "final_logit_softcapping": 4.0,
            "attention_bias": True, "tie_word_embeddings": False,
        },
    ),
    "gemma3_gqa_tied_one_rope_wide_window": (
        "gemma3",
        {
            **_GEMMA3_LAYERS, "head_dim": 8, "query_pre_attn_scalar": 6, "sliding_window": 64,
            "final_logit_softcapping": 3.0, "rope_parameters": _GEMMA3_ONE_ROPE,
        },
    ),
    "gemma3_gqa_untied_rope_per_type_wide_window": (
        "gemma3",
        {
            **_GEMMA3_LAYERS, "num_key_value_heads": 3, "head_dim": 16, "query_pre_attn_scalar": 20,
            "sliding_window": 64, "tie_word_embeddings": False, "rope_parameters": _GEMMA3_ROPE_PER_TYPE,
        },
    ),
    "gemma3_mqa_tied_bias_window_8": (
        "gemma3",
        {
            **_GEMMA3_LAYERS, "num_key_value_heads": 1, "head_dim": 8, "query_pre_attn_scalar": 10,
            "sliding_window": 8, "final_logit_softcapping": 3.0, "attention_bias": True,
            "rope_parameters": _GEMMA3_ROPE_PER_TYPE,
        },
    ),
}  # fmt: skip

ALL_VARIANTS = {**VARIANTS, **LLAMA_STYLE_VARIANTS, **SLIDING_LLAMA_STYLE_VARIANTS, **GEMMA_VARIANTS}


def _graft_mpt_biases(model):
    """MPT with no_bias=False has a bias on every linear and LayerNorm (llm-foundry); transformers'
    MptForCausalLM drops them, so they are added here to its own modules, which then use them."""
    import torch

    for module in model.transformer.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
            module.bias = torch.nn.Parameter(torch.zeros(module.weight.shape[0]))


@functools.cache
def hf_model(variant: str, std: float = 0.2):
    """The variant's tiny transformers model with random weights (built once per test session)."""
    import torch
    import transformers

    family, settings = ALL_VARIANTS[variant]
    config_class, model_class, base = HF_CLASSES[family]
    torch.manual_seed(sum(map(ord, variant)))
    model = getattr(transformers, model_class)(
        getattr(transformers, config_class)(**{"vocab_size": VOCAB, **base, **settings})
    )
    if family == "mpt" and not model.config.no_bias:
        _graft_mpt_biases(model)
    return randomize_weights(model, std, norm_mean=0.0 if family.startswith("gemma") else 1.0)


def checkpoint_tensors(model) -> dict[str, np.ndarray]:
    """State dict under the names checkpoints use (transformers 5 calls GPT-NeoX's `embed_out` `lm_head`)."""
    tensors = hf_state_dict(model)
    if model.config.model_type == "gpt_neox" and not model.config.tie_word_embeddings:
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
    return tensors


@functools.cache
def converted(variant: str):
    model = hf_model(variant)
    config = families.config_from_hf(model.config.to_dict())
    return config, convert_tensors(checkpoint_tensors(model), config)


@functools.cache
def expected_logits(variant: str) -> np.ndarray:
    return hf_logits(hf_model(variant), TOKENS)


def stream_reference(variant: str, tokens, num_sinks: int, window: int) -> np.ndarray:
    """The family's numpy reference, with slopes / frequencies taken from transformers itself."""
    model = hf_model(variant)
    import torch

    family, state_dict, hf_config = ALL_VARIANTS[variant][0], hf_state_dict(model), model.config
    if variant in LLAMA_STYLE_VARIANTS:  # Llama's tensor names and layout
        inv_freq = model.model.rotary_emb.inv_freq.numpy().astype(np.float64)  # scaled as transformers scales it
        return llama_stream_logits(state_dict, hf_config, tokens, num_sinks, window, inv_freq)
    if family == "mpt":
        alibi = model.transformer.build_mpt_alibi_tensor(hf_config.n_heads, 2)[:, 0].numpy()
        return mpt_stream_logits(state_dict, hf_config, tokens, num_sinks, window, slopes=alibi[:, 1] - alibi[:, 0])
    if family == "gpt_neox":
        inv_freq = model.gpt_neox.rotary_emb.inv_freq.numpy().astype(np.float64)
        return gpt_neox_stream_logits(state_dict, hf_config, tokens, num_sinks, window, inv_freq)
    if hf_config.alibi:
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor

        ones = torch.ones((1, 2), dtype=torch.long)
        slopes = build_alibi_tensor(ones, hf_config.num_attention_heads, torch.float32)[:, 0, 1].numpy()
        return falcon_stream_logits(state_dict, hf_config, tokens, num_sinks, window, slopes=slopes.astype(np.float64))
    inv_freq = model.transformer.rotary_emb.inv_freq.numpy().astype(np.float64)
    return falcon_stream_logits(state_dict, hf_config, tokens, num_sinks, window, inv_freq=inv_freq)
