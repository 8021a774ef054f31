"""Falcon decoder (Falcon-7B/40B/180B, Falcon2 and the ALiBi Falcon-RW models) in functional JAX.

Letters: B streams, T new tokens, V vocab, D model dim, F MLP dim, L layers, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim.

Every layout transformers supports reads the fused query_key_value rows as [K, G + 2, H] (per kv
group: its G queries, then its key, then its value): `new_decoder_architecture` with `num_kv_heads`
groups; the old multi-query layout [N + 2, H] is K = 1; the old multi-head layout [N, 3, H] is K = N.
Layers are parallel (x + attn + mlp) with one shared LayerNorm, or with two (`ln_attn`, `ln_mlp`:
the new architecture's default `num_ln_in_parallel_attn=2`), or sequential (old layout,
`parallel_attn=False`).

ALiBi: transformers adds `slope * position` to the raw q.k before dividing by sqrt(H), with slopes
rounded to bfloat16 (`build_alibi_tensor`), so the slopes here are bf16(standard slope) / sqrt(H).
It also rounds each product slope * position to bfloat16; that is exact while the slopes are powers
of two (up to 8 heads) and positions stay below 256, and is not reproduced beyond that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from streamjax.model import params as P
from streamjax.model.config import ModelConfig, check_known_fields, require, rope_from_hf
from streamjax.model.families.blocks import ACTIVATIONS, layer_norm_decoder_layer, layer_norm_final
from streamjax.model.positions import alibi_slopes

NAME = "falcon"
HF_MODEL_TYPES = ("falcon",)
TIED_HEAD = ("lm_head.weight", "transformer.word_embeddings.weight")

_HANDLED_FIELDS = {
    "vocab_size", "hidden_size", "n_embed", "num_hidden_layers", "num_attention_heads", "num_kv_heads",
    "num_key_value_heads", "num_ln_in_parallel_attn", "layer_norm_epsilon", "hidden_dropout", "alibi",
    "new_decoder_architecture", "multi_query", "parallel_attn", "bias", "max_position_embeddings", "rope_parameters",
    "rope_scaling", "rope_theta", "ffn_hidden_size", "activation", "tie_word_embeddings",
    "apply_residual_connection_post_layernorm",
}  # fmt: skip
# Checkpoint LayerNorm names per residual layout: (attention norm, MLP norm).
_NORM_NAMES = {
    "parallel": ("ln_attn", "ln_mlp"),
    "parallel_shared_norm": ("input_layernorm", None),
    "sequential": ("input_layernorm", "post_attention_layernorm"),
}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `FalconConfig` dict, old or new decoder architecture."""
    check_known_fields(hf, _HANDLED_FIELDS, NAME)
    require(
        not hf.get("apply_residual_connection_post_layernorm", False), "falcon post-layernorm residual is not supported"
    )
    act = hf.get("activation", "gelu")
    require(act in ACTIVATIONS, f"falcon activation {act!r} is not one of {sorted(ACTIVATIONS)}")
    hidden = hf.get("n_embed") or hf["hidden_size"]
    num_heads = hf["num_attention_heads"]
    require(hidden % num_heads == 0, f"falcon hidden_size={hidden} is not a multiple of {num_heads} heads")
    head_dim = hidden // num_heads
    num_kv_heads, residual_layout = _attention_layout(hf, num_heads)
    # transformers >= 5 also saves the kv heads it derives (1 for multi_query) as num_key_value_heads.
    saved = hf.get("num_key_value_heads")
    require(
        saved in (None, num_kv_heads),
        f"falcon num_key_value_heads={saved} disagrees with the {num_kv_heads} kv heads that num_kv_heads, "
        "multi_query and new_decoder_architecture give: fix one of them in config.json",
    )
    alibi = hf.get("alibi", False)
    theta, scaling = _rope(hf) if not alibi else (10000.0, None)
    return ModelConfig(
        family=NAME,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=hf.get("ffn_hidden_size") or 4 * hidden,
        norm_eps=hf.get("layer_norm_epsilon") or 1e-5,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        attention_bias=bool(hf.get("bias")),
        mlp_bias=bool(hf.get("bias")),
        position="alibi" if alibi else "rope",
        rope_theta=theta,
        rope_scaling=scaling,
        alibi_slopes=_alibi_slopes(num_heads, head_dim) if alibi else None,
        hidden_act=act,
        residual_layout=residual_layout,
    )


def _attention_layout(hf: Mapping[str, Any], num_heads: int) -> tuple[int, str]:
    """(kv heads, residual layout) of the new or old decoder architecture, as transformers runs them."""
    parallel, num_norms = hf.get("parallel_attn", True), hf.get("num_ln_in_parallel_attn")
    require(num_norms in (None, 1, 2), f"falcon num_ln_in_parallel_attn={num_norms} is not 1 or 2")
    if hf.get("new_decoder_architecture", False):
        require(parallel, "falcon new_decoder_architecture with parallel_attn=False does not run in transformers")
        num_kv_heads = hf.get("num_kv_heads") or num_heads
        return num_kv_heads, "parallel_shared_norm" if num_norms == 1 else "parallel"
    if not parallel:
        layout = "sequential"
    else:
        require(num_norms != 2, "falcon num_ln_in_parallel_attn=2 needs new_decoder_architecture=True")
        layout = "parallel_shared_norm"
    if hf.get("multi_query", True):
        return 1, layout
    require(hf.get("num_kv_heads") in (None, num_heads), "falcon without multi_query needs num_kv_heads == heads")
    return num_heads, layout


def _rope(hf: Mapping[str, Any]) -> tuple[float, tuple | None]:
    rope = rope_from_hf(hf, NAME, ("default", "linear"))
    require(rope.partial_rotary_factor == 1.0, "falcon partial_rotary_factor other than 1 is not supported")
    return rope.theta, rope.scaling


def _alibi_slopes(num_heads: int, head_dim: int) -> tuple[float, ...]:
    """Falcon's slopes in units of the scaled logits: bf16-rounded standard slopes over sqrt(H)."""
    rounded = alibi_slopes(num_heads).astype(ml_dtypes.bfloat16).astype(np.float32)
    return tuple(float(s) for s in rounded / np.float32(math.sqrt(head_dim)))


def layer_specs(config: ModelConfig) -> dict:
    bias = config.attention_bias
    specs = {
        **P.norm_specs("attn_norm", config, bias=True),
        **P.attention_specs(config, bias),
        **P.mlp_specs(config, bias),
    }
    if _NORM_NAMES[config.residual_layout][1] is not None:
        specs.update(P.norm_specs("mlp_norm", config, bias=True))
    return specs


def final_norm_specs(config: ModelConfig) -> dict:
    return P.norm_specs("final_norm", config, bias=True)


def hf_tensor_rules(config: ModelConfig) -> list[P.TensorRule]:
    """How each Hugging Face tensor maps onto a param (query_key_value rows are [K, G + 2, H])."""
    bias, layer = config.attention_bias, "transformer.h.{i}"
    attn_norm, mlp_norm = _NORM_NAMES[config.residual_layout]
    rules = [
        *P.head_rules("transformer.word_embeddings.weight", "lm_head.weight", config),
        *P.norm_rules("transformer.ln_f", ("final_norm",), bias=True),
        *P.norm_rules(f"{layer}.{attn_norm}", ("layers", "attn_norm"), bias=True),
        *P.qkv_rules(f"{layer}.self_attention.query_key_value", config, bias),
        *P.output_rules(f"{layer}.self_attention.dense", config, bias),
        *P.linear_rules(f"{layer}.mlp.dense_h_to_4h", "up", bias),
        *P.linear_rules(f"{layer}.mlp.dense_4h_to_h", "down", bias),
    ]
    if mlp_norm is not None:
        rules += P.norm_rules(f"{layer}.{mlp_norm}", ("layers", "mlp_norm"), bias=True)
    return rules


decoder_layer = layer_norm_decoder_layer
final_norm = layer_norm_final
