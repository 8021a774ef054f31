"""MPT decoder (MosaicML MPT-7B/30B: ALiBi, fused Wqkv, pre-LayerNorm, GELU MLP) in functional JAX.

Letters: B streams, T new tokens, V vocab, D model dim, F MLP dim (expansion_ratio * D), L layers,
N heads, H head dim.

ALiBi distances are cache-relative exactly as RoPE positions are (`streamjax.model.cache`): a window key
sits at its true distance, sink s at `min(t, S + W) - s`. MPT's slopes (`build_mpt_alibi_tensor`:
2^-(k * alibi_bias_max / P) over the next power of two P, odd-then-even for other head counts) equal
the standard `attention.alibi_slopes(N, alibi_bias_max)`; tests check that against transformers.

`no_bias=False` follows MPT (llm-foundry): every linear and every LayerNorm has a bias. Hugging Face's
`MptForCausalLM` ignores `no_bias` (and `alibi_bias_max`, `logit_scale`); streamjax refuses
`logit_scale` and learned position embeddings instead of guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamjax.model import params as P
from streamjax.model.config import ModelConfig, check_known_fields, require
from streamjax.model.families.blocks import layer_norm_decoder_layer, layer_norm_final
from streamjax.model.positions import alibi_slopes

NAME = "mpt"
HF_MODEL_TYPES = ("mpt",)
TIED_HEAD = ("lm_head.weight", "transformer.wte.weight")

_HANDLED_FIELDS = {
    "d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size", "resid_pdrop", "emb_pdrop",
    "layer_norm_epsilon", "learned_pos_emb", "attn_config", "init_device", "logit_scale", "no_bias",
    "embedding_fraction", "norm_type", "tie_word_embeddings",
    "init_config", "verbose", "tokenizer_name", "auto_map",  # llm-foundry export metadata
}  # fmt: skip
_HANDLED_ATTN_FIELDS = {
    "attn_type", "attn_pdrop", "attn_impl", "clip_qkv", "softmax_scale", "prefix_lm", "qk_ln",
    "attn_uses_sequence_id", "alibi", "alibi_bias_max",
}  # fmt: skip
_NORM_TYPES = ("low_precision_layernorm", "layernorm")  # the same LayerNorm, computed here in float32


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `MptConfig` dict (attention options in its `attn_config`)."""
    check_known_fields(hf, _HANDLED_FIELDS, NAME)
    attn = dict(hf.get("attn_config") or {})
    check_known_fields(attn, _HANDLED_ATTN_FIELDS, "mpt attn_config")
    require(
        attn.get("attn_type", "multihead_attention") == "multihead_attention", "mpt supports only multihead_attention"
    )
    for flag in ("prefix_lm", "qk_ln", "attn_uses_sequence_id"):
        require(not attn.get(flag, False), f"mpt attn_config.{flag}=True is not supported")
    require(attn.get("alibi", True), "mpt without ALiBi (learned position embeddings) is not supported")
    require(hf.get("logit_scale") is None, "mpt logit_scale is not supported (transformers ignores it too)")
    norm_type = hf.get("norm_type", "low_precision_layernorm")
    require(norm_type in _NORM_TYPES, f"mpt norm_type {norm_type!r} is not one of {_NORM_TYPES}")
    hidden, num_heads = hf["d_model"], hf["n_heads"]
    require(hidden % num_heads == 0, f"mpt d_model={hidden} is not a multiple of n_heads={num_heads}")
    bias = not hf.get("no_bias", True)
    return ModelConfig(
        family=NAME,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["n_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        intermediate_size=int(hf.get("expansion_ratio", 4) * hidden),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        max_position_embeddings=hf.get("max_seq_len", 2048),
        attention_bias=bias,
        mlp_bias=bias,
        position="alibi",
        alibi_slopes=tuple(float(s) for s in alibi_slopes(num_heads, attn.get("alibi_bias_max", 8))),
        attention_scale=attn.get("softmax_scale"),
        clip_qkv=attn.get("clip_qkv") or None,  # MPT treats 0 as "no clipping"
        hidden_act="gelu",
        residual_layout="sequential",
    )


def layer_specs(config: ModelConfig) -> dict:
    bias = config.attention_bias
    return {
        **P.norm_specs("attn_norm", config, bias),
        **P.attention_specs(config, bias),
        **P.norm_specs("mlp_norm", config, bias),
        **P.mlp_specs(config, bias),
    }


def final_norm_specs(config: ModelConfig) -> dict:
    return P.norm_specs("final_norm", config, config.attention_bias)


def hf_tensor_rules(config: ModelConfig) -> list[P.TensorRule]:
    """How each Hugging Face tensor maps onto a param; Wqkv rows are [q | k | v], each [N, H]."""
    bias, block = config.attention_bias, "transformer.blocks.{i}"
    return [
        *P.head_rules("transformer.wte.weight", "lm_head.weight", config),
        *P.norm_rules("transformer.norm_f", ("final_norm",), bias),
        *P.norm_rules(f"{block}.norm_1", ("layers", "attn_norm"), bias),
        *P.qkv_rules(f"{block}.attn.Wqkv", config, bias, parts_first=True),
        *P.output_rules(f"{block}.attn.out_proj", config, bias),
        *P.norm_rules(f"{block}.norm_2", ("layers", "mlp_norm"), bias),
        *P.linear_rules(f"{block}.ffn.up_proj", "up", bias),
        *P.linear_rules(f"{block}.ffn.down_proj", "down", bias),
    ]


decoder_layer = layer_norm_decoder_layer
final_norm = layer_norm_final
