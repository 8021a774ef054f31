"""GPT-NeoX decoder (Pythia, GPT-NeoX-20B: partial rotary, parallel residual, biased LayerNorms) in JAX.

Letters: B streams, T new tokens, V vocab, D model dim, F MLP dim, L layers, N heads, H head dim,
R rotary dims (`rotary_pct` * H; the rest of each head passes through unrotated).

The checkpoint's query_key_value rows are interleaved per head, [N, 3, H] (q, k, v of head 0, then
head 1, ...); they are split into q, k, v params on load. `use_parallel_residual` gives
x + attn(ln_1(x)) + mlp(ln_2(x)), otherwise the sequential pre-norm block. The untied head is
`embed_out` in checkpoints (transformers 5 renames it `lm_head` in memory and back on save).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamjax.model import params as P
from streamjax.model.config import ModelConfig, check_known_fields, require, rope_from_hf
from streamjax.model.families.blocks import ACTIVATIONS, layer_norm_decoder_layer, layer_norm_final

NAME = "gpt_neox"
HF_MODEL_TYPES = ("gpt_neox",)
TIED_HEAD = ("lm_head.weight", "gpt_neox.embed_in.weight")

_HANDLED_FIELDS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout", "classifier_dropout", "max_position_embeddings", "layer_norm_eps", "tie_word_embeddings",
    "use_parallel_residual", "rope_parameters", "rope_scaling", "rope_theta", "rotary_pct", "rotary_emb_base",
    "attention_bias", "is_decoder",
}  # fmt: skip


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `GPTNeoXConfig` dict (new `rope_parameters` or old `rotary_pct`)."""
    check_known_fields(hf, _HANDLED_FIELDS, NAME)
    act = hf.get("hidden_act", "gelu")
    require(act in ACTIVATIONS, f"gpt_neox hidden_act {act!r} is not one of {sorted(ACTIVATIONS)}")
    rope = rope_from_hf(hf, NAME, ("default", "linear"), ("rope_theta", "rotary_emb_base"), "rotary_pct", 0.25)
    hidden, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    require(hidden % num_heads == 0, f"gpt_neox hidden_size={hidden} is not a multiple of {num_heads} heads")
    head_dim = hidden // num_heads
    rotary_dim = int(head_dim * rope.partial_rotary_factor)
    require(rotary_dim % 2 == 0, f"gpt_neox rotary dims {rotary_dim} (rotary_pct * head_dim) must be even")
    return ModelConfig(
        family=NAME,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        attention_bias=hf.get("attention_bias", True),
        mlp_bias=True,
        rope_theta=rope.theta,
        rope_scaling=rope.scaling,
        rotary_dim=rotary_dim,
        hidden_act=act,
        residual_layout="parallel" if hf.get("use_parallel_residual", True) else "sequential",
    )


def layer_specs(config: ModelConfig) -> dict:
    return {
        **P.norm_specs("attn_norm", config, bias=True),
        **P.attention_specs(config, config.attention_bias),
        **P.norm_specs("mlp_norm", config, bias=True),
        **P.mlp_specs(config, bias=True),
    }


def final_norm_specs(config: ModelConfig) -> dict:
    return P.norm_specs("final_norm", config, bias=True)


def hf_tensor_rules(config: ModelConfig) -> list[P.TensorRule]:
    """How each Hugging Face tensor maps onto a param (query_key_value rows are [N, 3, H])."""
    bias, layer = config.attention_bias, "gpt_neox.layers.{i}"
    return [
        *P.head_rules("gpt_neox.embed_in.weight", "embed_out.weight", config),
        *P.norm_rules("gpt_neox.final_layer_norm", ("final_norm",), bias=True),
        *P.norm_rules(f"{layer}.input_layernorm", ("layers", "attn_norm"), bias=True),
        *P.qkv_rules(f"{layer}.attention.query_key_value", config, bias),  # rows [N, 3, H]: K = N, G = 1
        *P.output_rules(f"{layer}.attention.dense", config, bias),
        *P.norm_rules(f"{layer}.post_attention_layernorm", ("layers", "mlp_norm"), bias=True),
        *P.linear_rules(f"{layer}.mlp.dense_h_to_4h", "up", bias=True),
        *P.linear_rules(f"{layer}.mlp.dense_4h_to_h", "down", bias=True),
    ]


decoder_layer = layer_norm_decoder_layer
final_norm = layer_norm_final
