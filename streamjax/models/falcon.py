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

import jax
import ml_dtypes
import numpy as np

from streamjax import cache as cache_lib
from streamjax.attention import alibi_slopes
from streamjax.config import ModelConfig, check_known_fields, freeze_mapping, require
from streamjax.models import common
from streamjax.models.common import ParamSpec, TensorRule

FAMILY = "falcon"
TIED_HEAD = ("lm_head.weight", "transformer.word_embeddings.weight")  # (head, embedding) when tied

_HANDLED_FIELDS = {
    "vocab_size", "hidden_size", "n_embed", "num_hidden_layers", "num_attention_heads", "num_kv_heads",
    "num_ln_in_parallel_attn", "layer_norm_epsilon", "hidden_dropout", "alibi", "new_decoder_architecture",
    "multi_query", "parallel_attn", "bias", "max_position_embeddings", "rope_parameters", "rope_scaling",
    "rope_theta", "ffn_hidden_size", "activation", "tie_word_embeddings", "apply_residual_connection_post_layernorm",
}  # fmt: skip
_ROPE_TYPES = ("default", "linear")
# Checkpoint LayerNorm names per residual layout: (attention norm, MLP norm).
_NORM_NAMES = {
    "parallel": ("ln_attn", "ln_mlp"),
    "parallel_shared_norm": ("input_layernorm", None),
    "sequential": ("input_layernorm", "post_attention_layernorm"),
}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `FalconConfig` dict, old or new decoder architecture."""
    check_known_fields(hf, _HANDLED_FIELDS, FAMILY)
    require(
        not hf.get("apply_residual_connection_post_layernorm", False), "falcon post-layernorm residual is not supported"
    )
    act = hf.get("activation", "gelu")
    require(act in common.ACTIVATIONS, f"falcon activation {act!r} is not one of {sorted(common.ACTIVATIONS)}")
    hidden = hf.get("n_embed") or hf["hidden_size"]
    num_heads = hf["num_attention_heads"]
    require(hidden % num_heads == 0, f"falcon hidden_size={hidden} is not a multiple of {num_heads} heads")
    head_dim = hidden // num_heads
    num_kv_heads, residual_layout = _attention_layout(hf, num_heads)
    alibi = hf.get("alibi", False)
    theta, scaling = _rope(hf) if not alibi else (10000.0, None)
    return ModelConfig(
        family=FAMILY,
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
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    require(rope["rope_type"] in _ROPE_TYPES, f"rope type {rope['rope_type']!r} is not one of {_ROPE_TYPES}")
    require(rope.pop("partial_rotary_factor", 1.0) == 1.0, "falcon partial_rotary_factor other than 1 is not supported")
    return float(theta), None if rope["rope_type"] == "default" else freeze_mapping(rope)


def _alibi_slopes(num_heads: int, head_dim: int) -> tuple[float, ...]:
    """Falcon's slopes in units of the scaled logits: bf16-rounded standard slopes over sqrt(H)."""
    rounded = alibi_slopes(num_heads).astype(ml_dtypes.bfloat16).astype(np.float32)
    return tuple(float(s) for s in rounded / np.float32(math.sqrt(head_dim)))


def param_specs(config: ModelConfig) -> dict:
    """Shape and logical axes of every parameter (a pytree matching the params)."""
    D, L, V, bias = config.hidden_size, config.num_layers, config.vocab_size, config.attention_bias
    layers = {
        **common.norm_specs("attn_norm", (D,), ("embed",), bias=True),
        **common.attention_specs(config, bias),
        **common.mlp_specs(config, bias),
    }
    if _NORM_NAMES[config.residual_layout][1] is not None:
        layers.update(common.norm_specs("mlp_norm", (D,), ("embed",), bias=True))
    specs = {"embed": ParamSpec((V, D), ("vocab", "embed")), "layers": common.per_layer(layers, L)}
    specs.update(common.norm_specs("final_norm", (D,), ("embed",), bias=True))
    if not config.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def hf_tensor_rules(config: ModelConfig) -> list[TensorRule]:
    """How each Hugging Face tensor maps onto a param (query_key_value rows are [K, G + 2, H])."""
    bias, layer = config.attention_bias, "transformer.h.{i}"
    attn_norm, mlp_norm = _NORM_NAMES[config.residual_layout]
    rules = [
        TensorRule("transformer.word_embeddings.weight", ("embed",)),
        *common.norm_rules("transformer.ln_f", ("final_norm",), bias=True),
        *common.norm_rules(f"{layer}.{attn_norm}", ("layers", "attn_norm"), bias=True),
        *common.qkv_rules(f"{layer}.self_attention.query_key_value", config, bias),
        *common.output_rules(f"{layer}.self_attention.dense", config, bias),
        *common.linear_rules(f"{layer}.mlp.dense_h_to_4h", "up", bias),
        *common.linear_rules(f"{layer}.mlp.dense_4h_to_h", "down", bias),
    ]
    if mlp_norm is not None:
        rules += common.norm_rules(f"{layer}.{mlp_norm}", ("layers", "mlp_norm"), bias=True)
    if not config.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head",), np.transpose))
    return rules


def forward(
    params: dict, cache: cache_lib.SinkCache, tokens: jax.Array, config: ModelConfig
) -> tuple[jax.Array, cache_lib.SinkCache]:
    """Feed tokens [B, T] to every stream: logits [B, T, V] (float32) and the advanced cache."""
    return common.run_decoder(params, cache, tokens, config, common.layer_norm_decoder_layer)
