"""The attention layer every model family shares: fused q/k/v projection, sink + window attention over
one layer's cache entry and the chunk, output projection.

Letters: B streams, T new tokens, D model dim, S sinks, C cache slots, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.

A chunk's queries see up to three key blocks (see `streamjax.model.cache`), each with its own positions: the
sinks [S], every cache slot [C] (its sink slots masked: they are the sink block) and the chunk's own
keys [T]. The cache is read where it lies, so no layer copies it, and the blocks are scored separately
and normalised by one softmax in float32, never concatenated. A block with no keys (no sinks, or no
cache) is left out when the program is traced. A sink softmax (`ModelConfig.softmax`) adds one more
term, with no value, to that softmax's denominator.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from streamjax.model.cache import ChunkPlan, sink_block
from streamjax.model.config import ModelConfig
from streamjax.model.norms import rms_norm
from streamjax.model.positions import apply_rope, config_alibi_slopes


class LayerCache(NamedTuple):
    """One layer's entry of `SinkCache`: keys [B, K, H, C] and values [B, K, C, H] before the chunk."""

    keys: jax.Array
    values: jax.Array


class LayerOutputs(NamedTuple):
    """What a layer hands back besides its activations.

    keys, values: [B, K, T, H] the chunk's keys (after `q_norm`/`k_norm` if any, before RoPE) and values,
        for the cache.
    weights: [B, N, T, S + C + T] the softmax weights over sinks, cache slots (sink slots 0) and the
        chunk. Only computed when a caller returns them: jit drops outputs nobody uses. With a sink
        softmax (`ModelConfig.softmax` "zero_sink", "sink_logit") they are the weights of the real keys
        alone and sum to 1 minus the sink term's share.
    """

    keys: jax.Array
    values: jax.Array
    weights: jax.Array


def self_attention(
    p: dict, h: jax.Array, layer_cache: LayerCache | None, plan: ChunkPlan, config: ModelConfig
) -> tuple[jax.Array, LayerOutputs]:
    """Self-attention of the normed input h [B, T, D] through one layer's cache entry -> [B, T, D].

    Params: `qkv` [D, K, G + 2, H] (per kv head its G queries, its key, its value: one matrix product
    for all three), `o` [N, H, D], optional `qkv_bias` [K, G + 2, H] and `o_bias` [D], and with
    `config.softmax == "sink_logit"` the learned sink logits `sink_logit` [N], and with `config.qk_norm`
    the per-head query and key RMSNorm weights `q_norm` and `k_norm` [H] (applied before RoPE, so the
    cache holds normed keys).
    """
    batch, length, dim = h.shape
    qkv = add_bias(jnp.einsum("btd,dkph->btkph", h, p["qkv"]), p.get("qkv_bias"))  # [B, T, K, G + 2, H]
    if config.clip_qkv is not None:
        qkv = jnp.clip(qkv, -config.clip_qkv, config.clip_qkv)
    group = qkv.shape[3] - 2
    queries = qkv[:, :, :, :group].transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    keys, values = (qkv[:, :, :, part].transpose(0, 2, 1, 3) for part in (group, group + 1))  # [B, K, T, H]
    if config.qk_norm:
        queries, keys = rms_norm(queries, p["q_norm"], config.norm_eps), rms_norm(keys, p["k_norm"], config.norm_eps)
    sink = sink_scores(config, p.get("sink_logit"))
    attended, weights = sink_window_attention(queries, keys, values, layer_cache, plan, config, sink)
    attended = attended.transpose(0, 3, 1, 2, 4).reshape(batch, length, -1)  # [B, T, N * H]
    out = add_bias(attended @ p["o"].reshape(-1, dim), p.get("o_bias"))
    return out, LayerOutputs(keys, values, weights)


def sink_window_attention(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    layer_cache: LayerCache | None,
    plan: ChunkPlan,
    config: ModelConfig,
    sink: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of queries [B, K, G, T, H] over the sinks, the cache slots and the chunk's own keys and
    values [B, K, T, H] (before RoPE). `sink` (`sink_scores`): one more logit per query head, [K, G, 1, 1]
    or a scalar, with no value, in every softmax; None for the standard softmax. Returns the output
    [B, K, G, T, H] in the values' dtype and the weights [B, N, T, S + C + T] (see `LayerOutputs`)."""
    blocks = _key_blocks(queries, keys, values, layer_cache, plan, config)
    scale = config.head_dim**-0.5 if config.attention_scale is None else config.attention_scale
    scores = [_block_scores(block, config, scale) for block in blocks]
    # One softmax over the blocks without concatenating them: a shared max, each block's exponentials,
    # and the normalisation applied to the [.., H] output rather than to the weights.
    peak = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores])
    peak = peak if sink is None else jnp.maximum(peak, sink)
    exponentials = [jnp.exp(s - peak) for s in scores]
    total = sum(jnp.sum(e, axis=-1, keepdims=True) for e in exponentials)
    total = total if sink is None else total + jnp.exp(sink - peak)  # the sink adds weight but no value
    attended = sum(
        _head_matmul(e.astype(block.values.dtype), block.values, right_contracting=2)
        for e, block in zip(exponentials, blocks)
    )
    weights = jnp.concatenate(exponentials, axis=-1) / total
    weights = weights.reshape(weights.shape[0], -1, *weights.shape[3:])  # [B, N, T, keys]
    return (attended / total).astype(values.dtype), weights  # a cache dtype must not leak into activations


def sink_scores(config: ModelConfig, sink_logit: jax.Array | None) -> jax.Array | None:
    """The extra logit of `config.softmax` in float32: None ("standard"), 0 ("zero_sink") or the layer's
    learned `sink_logit` [N] as [K, G, 1, 1] ("sink_logit": query head n is g of kv head n // G)."""
    if config.softmax == "standard":
        return None
    if config.softmax == "zero_sink":
        return jnp.zeros((), jnp.float32)
    return sink_logit.astype(jnp.float32).reshape(config.num_kv_heads, -1, 1, 1)


class _Block(NamedTuple):
    """One key block: queries [B, K, G, T, H] (rotated), keys rotated, [B, K, keys, H] or (`keys_last`)
    [B, K, H, keys], values [B, K, keys, H], positions of queries [B, T] and keys [B, keys], mask [B, T, keys]."""

    queries: jax.Array
    keys: jax.Array
    values: jax.Array
    query_positions: jax.Array
    key_positions: jax.Array
    mask: jax.Array
    keys_last: bool = False


def _key_blocks(queries, keys, values, layer_cache, plan: ChunkPlan, config: ModelConfig) -> list[_Block]:
    """The sink block (if S > 0), the cache-slot block (if there is a cache) and the chunk block."""
    rope = config.position == "rope"
    rotation = plan.rotations or (None,) * 5
    rotate = lambda x, index, dims_last=True: apply_rope(x, rotation[index], dims_last) if rope else x  # noqa: E731
    window_queries = rotate(queries, 2)
    slot_positions, chunk_positions = jnp.split(plan.window_key_positions, [plan.capacity], axis=-1)
    slot_mask, chunk_mask = jnp.split(plan.window_mask, [plan.capacity], axis=-1)
    chunk = _Block(window_queries, rotate(keys, 4), values, plan.window_query_positions, chunk_positions, chunk_mask)
    if layer_cache is None:
        return [chunk]
    cached = _Block(
        window_queries,
        rotate(layer_cache.keys, 3, dims_last=False),
        layer_cache.values,
        plan.window_query_positions,
        slot_positions,
        slot_mask,
        keys_last=True,
    )
    if plan.num_sinks == 0:
        return [cached, chunk]
    sink_keys = sink_block(layer_cache.keys[..., : plan.num_sinks].swapaxes(-1, -2), keys, plan)
    sink_values = sink_block(layer_cache.values[:, :, : plan.num_sinks], values, plan)
    sinks = _Block(
        rotate(queries, 0),
        rotate(sink_keys, 1),
        sink_values,
        plan.sink_query_positions,
        plan.sink_key_positions,
        plan.sink_mask,
    )
    return [sinks, cached, chunk]


def _block_scores(block: _Block, config: ModelConfig, scale: float) -> jax.Array:
    """Masked scores [B, K, G, T, keys] in float32 of one key block (soft-capped if the config says so)."""
    scores = _head_matmul(block.queries, block.keys, right_contracting=2 if block.keys_last else 3) * scale
    if config.attn_logit_softcap is not None:
        scores = config.attn_logit_softcap * jnp.tanh(scores / config.attn_logit_softcap)
    if config.position == "alibi":
        slopes = config_alibi_slopes(config).reshape(config.num_kv_heads, -1)
        distance = block.query_positions[:, :, None] - block.key_positions[:, None, :]  # [B, T, keys]
        scores = scores - slopes[None, :, :, None, None] * distance[:, None, None].astype(jnp.float32)
    return jnp.where(block.mask[:, None, None], scores, jnp.finfo(jnp.float32).min)


def _head_matmul(left: jax.Array, right: jax.Array, right_contracting: int) -> jax.Array:
    """Per kv head: left [B, K, G, T, X] times right [B, K, Y, Z] -> [B, K, G, T, Z or Y], float32.

    X is contracted with Y (`right_contracting` 2: weights times values, queries times the cache's
    keys) or with Z (3: queries times keys stored [keys, H]). Written as one batched product over
    (B, K) with the right operand as stored, for which XLA copies neither operand (an einsum with
    the heads axis elsewhere copied the whole value block on CPU).
    """
    batch, heads, groups, length, inner = left.shape
    flat_left = left.reshape(batch * heads, groups * length, inner)
    flat_right = right.reshape(batch * heads, *right.shape[2:])
    out = jax.lax.dot_general(
        flat_left, flat_right, (((2,), (right_contracting - 1,)), ((0,), (0,))), preferred_element_type=jnp.float32
    )
    return out.reshape(batch, heads, groups, length, -1)


def add_bias(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    """x plus its bias, for the layers whose checkpoints have one (bias None: x as it is)."""
    return x if bias is None else x + bias
