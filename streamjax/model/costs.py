"""What one token costs a model: bytes read and floating-point operations (for throughput and roofline
fractions in `experiments.efficiency` and `experiments.pretrain`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from streamjax.model.config import ModelConfig


def param_bytes_per_token(params: dict, config: ModelConfig) -> int:
    """Bytes of params one decoded token reads: all of them, but a single row of an untied embedding."""
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    embed = params["embed"]
    return total if config.tie_embeddings else total - embed.nbytes + embed.nbytes // embed.shape[0]


def cache_bytes(config: ModelConfig, capacity: int, dtype) -> int:
    """Bytes of the keys and values of a cache of `capacity` slots (what a decode step reads)."""
    return 2 * config.num_layers * capacity * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def matmul_params(params: dict, config: ModelConfig) -> int:
    """Weights used in matrix products per token: every layer's matrices and the head [D, V]."""
    layer_matrices = [
        leaf.size
        for layer in params["layers"]
        for name, leaf in layer.items()
        if leaf.ndim >= 2 and not name.endswith("_bias")
    ]
    return sum(layer_matrices) + config.hidden_size * config.vocab_size


def flops_per_token(params: dict, config: ModelConfig, keys_per_query: int) -> int:
    """FLOPs of one token: 2 per matrix weight, and 4 N H per attended key per layer (scores and values).

    `keys_per_query` is the width attention computes (masked keys included): S + W + T for a chunk of T.
    """
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * keys_per_query
    return 2 * matmul_params(params, config) + attention
