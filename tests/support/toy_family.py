"""A toy model family written against the protocol of `streamjax.families` alone (see there).

Pre-norm blocks with weightless RMSNorm, the shared attention layer and a ReLU MLP; the head is tied
to the embedding. Its Hugging Face-style config has `model_type` "toy".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from streamjax.model import params as P
from streamjax.model.attention import LayerCache, LayerOutputs, self_attention
from streamjax.model.cache import ChunkPlan
from streamjax.model.config import ModelConfig
from streamjax.model.families.blocks import mlp_block

NAME = "toy"
HF_MODEL_TYPES = ("toy",)
TIED_HEAD = ("lm_head.weight", "embed.weight")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    heads = hf["heads"]
    return ModelConfig(
        family=NAME, vocab_size=hf["vocab"], hidden_size=hf["dim"], num_layers=hf["layers"], num_heads=heads,
        num_kv_heads=heads, head_dim=hf["dim"] // heads, intermediate_size=2 * hf["dim"], norm_eps=1e-6,
        tie_embeddings=True, max_position_embeddings=1024, rope_theta=100.0, hidden_act="relu",
    )  # fmt: skip


def layer_specs(config: ModelConfig) -> dict:
    return {**P.attention_specs(config, bias=False), **P.mlp_specs(config, bias=False)}


def final_norm_specs(config: ModelConfig) -> dict:
    return {}


def hf_tensor_rules(config: ModelConfig) -> list[P.TensorRule]:
    """Its checkpoints store every param as it is, under "embed.weight" and "layers.{i}.<name>"."""
    layer_rules = [P.TensorRule(f"layers.{{i}}.{name}", ("layers", name)) for name in layer_specs(config)]
    return [P.TensorRule("embed.weight", ("embed",)), *layer_rules]


def _norm(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def decoder_layer(
    p: dict, x: jax.Array, layer_cache: LayerCache | None, plan: ChunkPlan, config: ModelConfig
) -> tuple[jax.Array, LayerOutputs]:
    attended, outputs = self_attention(p, _norm(x), layer_cache, plan, config)
    x = x + attended
    return x + mlp_block(p, _norm(x), config), outputs


def final_norm(params: dict, x: jax.Array, config: ModelConfig) -> jax.Array:
    return _norm(x)
