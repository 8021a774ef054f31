"""What one token costs a model: bytes read and floating-point operations (for throughput and roofline
fractions in `experiments.efficiency` and `experiments.pretrain`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from streamjax.model.cache import check_sliding_cache
from streamjax.model.config import ModelConfig


def param_bytes_per_token(params: dict, config: ModelConfig) -> int:
    """Bytes of params one decoded token reads: all of them, but a single row of an untied embedding."""
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    embed = params["embed"]
    return total if config.tie_embeddings else total - embed.nbytes + embed.nbytes // embed.shape[0]


def per_layer(config: ModelConfig, full: int, sliding: int | None = None) -> list[int]:
    """Each layer's figure, in layer order: `full` on full-attention layers, `sliding` on sliding ones
    (default: the ring `init_cache` gives them by default, the model's own w - 1 slots)."""
    if sliding is None:
        sliding = check_sliding_cache(config, 0, None)
    return [full if kind == "full_attention" else sliding for kind in config.layer_type_of]


def cache_bytes(config: ModelConfig, capacity: int, dtype, sliding_capacity: int | None = None) -> int:
    """Bytes of one stream's keys and values (what a decode step reads): `capacity` slots on each
    full-attention layer, `sliding_capacity` on each sliding layer of a hybrid model (default w - 1)."""
    slots = sum(per_layer(config, capacity, sliding_capacity))
    return 2 * slots * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def matmul_params(params: dict, config: ModelConfig) -> int:
    """Weights used in matrix products per token: every layer's matrices and the head [D, V]."""
    layer_matrices = [
        leaf.size
        for layer in params["layers"]
        for name, leaf in layer.items()
        if leaf.ndim >= 2 and not name.endswith("_bias")
    ]
    return sum(layer_matrices) + config.hidden_size * config.vocab_size


def flops_per_token(
    params: dict, config: ModelConfig, keys_per_query: int, sliding_keys_per_query: int | None = None
) -> int:
    """FLOPs of one token: 2 per matrix weight, and 4 N H per attended key per layer (scores and values).

    `keys_per_query` is the width the full-attention layers compute (masked keys included): S + W + T
    for a chunk of T through an S + W cache. `sliding_keys_per_query` is the sliding layers' (their ring
    + T through a hybrid cache); default `keys_per_query`, as in a pass without a cache, where every
    layer computes every key of the chunk and masks what it does not see.
    """
    sliding = keys_per_query if sliding_keys_per_query is None else sliding_keys_per_query
    widths = per_layer(config, keys_per_query, sliding)
    attention = 4 * config.num_heads * config.head_dim * sum(widths)
    return 2 * matmul_params(params, config) + attention
