"""Llama-family decoder (Llama 1/2/3, SmolLM2, Qwen2-style q/k/v biases) in functional JAX.

Letters: B streams, T new tokens, V vocab, D model dim, F MLP dim, L layers, N query heads,
K kv heads, H head dim.

Params are a nested dict; `params["layers"]` is a list with one dict of weights per layer (see
`common.per_layer`). The cache comes in and goes out (`SinkCache`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from streamjax import cache as cache_lib
from streamjax.config import ModelConfig, check_known_fields, freeze_mapping, require
from streamjax.models.common import (
    ParamSpec,
    TensorRule,
    add_bias,
    attention_block,
    attention_specs,
    per_layer,
    rms_norm,
    run_decoder,
    separate_qkv_rules,
)

FAMILY = "llama"
TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")  # (head, embedding) when tie_word_embeddings

_HANDLED_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
    "mlp_bias", "pretraining_tp",
}  # fmt: skip
_ROPE_TYPES = ("default", "linear", "llama3")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `LlamaConfig` dict (old `rope_scaling` or new `rope_parameters`)."""
    check_known_fields(hf, _HANDLED_FIELDS, FAMILY)
    require(hf.get("hidden_act", "silu") == "silu", f"llama hidden_act {hf.get('hidden_act')!r} is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    require(rope["rope_type"] in _ROPE_TYPES, f"rope type {rope['rope_type']!r} is not one of {_ROPE_TYPES}")
    require(rope.get("partial_rotary_factor", 1.0) == 1.0, "llama partial_rotary_factor other than 1 is not supported")
    num_heads = hf["num_attention_heads"]
    return ModelConfig(
        family=FAMILY,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        rope_theta=float(rope_theta),
        rope_scaling=None if rope["rope_type"] == "default" else freeze_mapping(rope),
    )


def param_specs(config: ModelConfig) -> dict:
    """Shape and logical axes of every parameter (a pytree matching the params)."""
    D, F, L, V = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size
    layers = {
        "attn_norm": ParamSpec((D,), ("embed",), init="ones"),
        **attention_specs(config, config.attention_bias),
        "mlp_norm": ParamSpec((D,), ("embed",), init="ones"),
        "gate_up": ParamSpec((D, 2, F), ("embed", "parts", "mlp")),
        "down": ParamSpec((F, D), ("mlp", "embed")),
    }
    if config.mlp_bias:
        layers["gate_up_bias"] = ParamSpec((2, F), ("parts", "mlp"), init="zeros")
        layers["down_bias"] = ParamSpec((D,), ("embed",), init="zeros")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "layers": per_layer(layers, L),
        "final_norm": ParamSpec((D,), ("embed",), init="ones"),
    }
    if not config.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def hf_tensor_rules(config: ModelConfig) -> list[TensorRule]:
    """How each Hugging Face tensor maps onto a param (HF linear weights are [out, in])."""
    N, H, D = config.num_heads, config.head_dim, config.hidden_size
    layer = "model.layers.{i}"
    gate_up = tuple(f"{layer}.mlp.{name}_proj" for name in ("gate", "up"))
    rules = [
        TensorRule("model.embed_tokens.weight", ("embed",)),
        TensorRule("model.norm.weight", ("final_norm",)),
        TensorRule(f"{layer}.input_layernorm.weight", ("layers", "attn_norm")),
        TensorRule(f"{layer}.post_attention_layernorm.weight", ("layers", "mlp_norm")),
        *separate_qkv_rules(tuple(f"{layer}.self_attn.{x}_proj" for x in "qkv"), config, config.attention_bias),
        TensorRule(f"{layer}.self_attn.o_proj.weight", ("layers", "o"), lambda w: w.T.reshape(N, H, D)),
        TensorRule(tuple(f"{s}.weight" for s in gate_up), ("layers", "gate_up"), lambda g, u: np.stack([g.T, u.T], 1)),
        TensorRule(f"{layer}.mlp.down_proj.weight", ("layers", "down"), np.transpose),
    ]
    if config.attention_bias:
        rules.append(TensorRule(f"{layer}.self_attn.o_proj.bias", ("layers", "o_bias")))
    if config.mlp_bias:
        rules += [
            TensorRule(tuple(f"{s}.bias" for s in gate_up), ("layers", "gate_up_bias"), lambda g, u: np.stack([g, u])),
            TensorRule(f"{layer}.mlp.down_proj.bias", ("layers", "down_bias")),
        ]
    if not config.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head",), np.transpose))
    return rules


def forward(
    params: dict, cache: cache_lib.SinkCache, tokens: jax.Array, config: ModelConfig
) -> tuple[jax.Array, cache_lib.SinkCache]:
    """Feed tokens [B, T] to every stream: logits [B, T, V] (float32) and the advanced cache."""
    final_norm = lambda params, x: rms_norm(x, params["final_norm"], config.norm_eps)  # noqa: E731
    return run_decoder(params, cache, tokens, config, _decoder_layer, final_norm)


def _decoder_layer(p, x, cached_keys, cached_values, plan, config: ModelConfig, num_sinks: int):
    h = rms_norm(x, p["attn_norm"], config.norm_eps)
    attended, keys, values = attention_block(p, h, cached_keys, cached_values, plan, config, num_sinks)
    x = x + attended
    h = rms_norm(x, p["mlp_norm"], config.norm_eps)
    gate_up = add_bias(jnp.einsum("btd,dpf->btpf", h, p["gate_up"]), p.get("gate_up_bias"))  # one product for both
    hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    x = x + add_bias(jnp.einsum("btf,fd->btd", hidden, p["down"]), p.get("down_bias"))
    return x, keys, values
