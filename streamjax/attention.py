"""Sink + window attention shared by every model family.

Letters: B streams, T new tokens, S sinks, W window, N query heads, K kv heads, G = N // K query
heads per kv head, H head dim, R rotary dims.

Attention over a chunk splits into a sink block and a window block (see `streamjax.cache`), each
with its own query and key positions. The window block is read where it lies, as every slot of the
cache (its sink slots masked) and the chunk's own keys, so no layer copies its cache; the three key
blocks are scored separately and normalised by one softmax in float32 (never concatenated). The
cache's keys are stored [H, C] per kv head, so queries contract with their rows; the other blocks'
keys are [keys, H].
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from streamjax.cache import ChunkPlan, SinkCache, plan_chunk, sink_block
from streamjax.config import ModelConfig


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [R // 2] of the rotary embedding, with `linear` or `llama3` scaling."""
    rotary_dim = config.rotary_dim or config.head_dim
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    inv_freq = (1.0 / (config.rope_theta**exponents)).astype(np.float32)
    scaling = config.rope_scaling_dict
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / np.float32(scaling["factor"])
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    return inv_freq


def _llama3_frequencies(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_rotation(
    positions: jax.Array, first: int, last: int, inv_freq: np.ndarray, dims_last: bool = True
) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, P, R/2] (`dims_last=False`: [B, R/2, P]) of the rotary angles at integer
    `positions` [B, P] in [first, last].

    The angles of every position in the range are computed on the host in float64 and rounded once,
    so cos and sin are exact to float32 however far positions sit from 0; a float32 product
    `position * inv_freq` would be off by up to |angle| * 2^-24 radians. Positions outside the range
    (only those of masked, unfilled slots) are clipped into it.
    """
    angles = np.arange(first, last + 1, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)
    index = jnp.clip(positions - first, 0, last - first)
    if dims_last:
        return tuple(jnp.asarray(table.astype(np.float32))[index] for table in (np.cos(angles), np.sin(angles)))
    # Gathered along the tables' last axis straight into [B, R/2, P]: a gather of rows then a transpose
    # had XLA transpose the table again inside every layer's rotation (4x slower on CPU).
    index = jnp.broadcast_to(index[:, None, :], (index.shape[0], angles.shape[1], index.shape[1]))
    tables = (np.cos(angles).T[None], np.sin(angles).T[None])  # [1, R/2, positions]
    return tuple(jnp.take_along_axis(jnp.asarray(table.astype(np.float32)), index, axis=2) for table in tables)


def apply_rope(x: jax.Array, rotation: tuple[jax.Array, jax.Array], dims_last: bool = True) -> jax.Array:
    """Rotate the first R head dims of `x` (half-split layout) by `rope_rotation` output.

    x: [B, ..., P, H] and rotation [B, P, R/2], or with `dims_last=False` x [B, ..., H, P] (the
    cache's keys) and rotation [B, R/2, P].
    """
    cos, sin = (t.reshape(t.shape[0], *(1,) * (x.ndim - 3), *t.shape[1:]) for t in rotation)
    axis = -1 if dims_last else -2
    rotary, passthrough = jnp.split(x, [2 * cos.shape[axis]], axis=axis)
    first, second = jnp.split(rotary.astype(jnp.float32), 2, axis=axis)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=axis)
    return jnp.concatenate([rotated.astype(x.dtype), passthrough], axis=axis)


class AttentionPlan(NamedTuple):
    """A chunk's `ChunkPlan` and what attention derives from its positions, once for every layer.

    sink_key_positions: [B, S] the sinks' cache positions 0..S-1.
    rotations: for RoPE, (cos, sin) of (sink queries, sink keys, window queries, cache-slot keys, chunk keys),
        each [B, P, R/2] but the cache-slot keys' [B, R/2, C] (the cache's key layout); None for ALiBi,
        whose bias is computed from the positions in each layer.
    """

    chunk: ChunkPlan
    sink_key_positions: jax.Array
    rotations: tuple | None


def plan_attention(cache: SinkCache, num_new: int, config: ModelConfig) -> AttentionPlan:
    """Plan feeding `num_new` tokens to every stream of `cache` (see `streamjax.cache.plan_chunk`)."""
    chunk = plan_chunk(cache, num_new)
    sink_key_positions = jnp.broadcast_to(jnp.arange(cache.num_sinks), (cache.batch_size, cache.num_sinks))
    rotations = None
    if config.position == "rope":
        # Sink-block positions lie in [0, S + W]; window-block offsets from the chunk start in [-W, T).
        inv_freq, last = rope_frequencies(config), max(cache.capacity, num_new)
        positions = (
            chunk.sink_query_positions,
            sink_key_positions,
            chunk.window_query_positions,
            chunk.window_key_positions[:, : cache.capacity],
            chunk.window_key_positions[:, cache.capacity :],
        )
        rotations = tuple(
            rope_rotation(p, -cache.window, last, inv_freq, dims_last=block != 3) for block, p in enumerate(positions)
        )
    return AttentionPlan(chunk, sink_key_positions, rotations)


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> np.ndarray:
    """Per-head ALiBi slopes [N] (Press et al.), for head counts that are not powers of two too."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-max_bias / closest)
    slopes = base ** np.arange(1, closest + 1)
    if closest < num_heads:
        extra_base = 2.0 ** (-max_bias / (2 * closest))
        slopes = np.concatenate([slopes, extra_base ** np.arange(1, 2 * (num_heads - closest) + 1, 2)])
    return slopes.astype(np.float32)


def config_alibi_slopes(config: ModelConfig) -> np.ndarray:
    """The slopes [N] a config asks for: its own `alibi_slopes`, else the standard ones."""
    if config.alibi_slopes is None:
        return alibi_slopes(config.num_heads)
    return np.asarray(config.alibi_slopes, np.float32)


def sink_window_attention(
    queries: jax.Array,
    new_keys: jax.Array,
    new_values: jax.Array,
    cached_keys: jax.Array,
    cached_values: jax.Array,
    plan: AttentionPlan,
    config: ModelConfig,
    num_sinks: int,
    scale: float | None = None,
) -> jax.Array:
    """Attention of a chunk's queries [B, T, N, H] over sinks, window and the chunk itself.

    new_keys, new_values: [B, K, T, H] the chunk's keys (before RoPE) and values.
    cached_keys: [B, K, H, C], cached_values: [B, K, C, H] this layer's cache slots before the chunk
        (layouts of `streamjax.cache.SinkCache`).
    scale: logit scale; None takes `config.attention_scale`, else 1/sqrt(H).
    Returns [B, T, N, H] in the dtype of `new_values`.
    """
    chunk, capacity = plan.chunk, cached_values.shape[2]
    batch, length, num_heads, head_dim = queries.shape
    grouped = queries.reshape(batch, length, config.num_kv_heads, -1, head_dim).transpose(0, 2, 3, 1, 4)
    # Blocks: sinks [S], every cache slot [C] (its sink slots masked: they are the sink block), chunk [T].
    cached_sink_keys = cached_keys[..., :num_sinks].swapaxes(-1, -2)
    keys = [sink_block(cached_sink_keys, new_keys, chunk), cached_keys, new_keys]
    values = (sink_block(cached_values[:, :, :num_sinks], new_values, chunk), cached_values, new_values)
    sink_queries = window_queries = grouped  # [B, K, G, T, H]
    if config.position == "rope":
        sink_queries, window_queries = apply_rope(grouped, plan.rotations[0]), apply_rope(grouped, plan.rotations[2])
        keys = [
            apply_rope(keys[0], plan.rotations[1]),
            apply_rope(keys[1], plan.rotations[3], dims_last=False),
            apply_rope(keys[2], plan.rotations[4]),
        ]
    slot_positions, chunk_positions = jnp.split(chunk.window_key_positions, [capacity], axis=-1)
    slot_mask, chunk_mask = jnp.split(chunk.window_mask, [capacity], axis=-1)
    blocks = (  # (queries, query positions, key positions, mask, key axis of H) of the three blocks
        (sink_queries, chunk.sink_query_positions, plan.sink_key_positions, chunk.sink_mask, 3),
        (window_queries, chunk.window_query_positions, slot_positions, slot_mask, 2),
        (window_queries, chunk.window_query_positions, chunk_positions, chunk_mask, 3),
    )
    if scale is None:
        scale = config.head_dim**-0.5 if config.attention_scale is None else config.attention_scale
    scores = [_block_scores(*block, k, config, scale) for block, k in zip(blocks, keys)]
    # One softmax over the three blocks without concatenating them: a shared max, each block's
    # exponentials, and the normalisation applied to the [.., H] output rather than to the weights.
    lowest = jnp.finfo(jnp.float32).min  # the sink block is empty when S = 0
    peak = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True, initial=lowest) for s in scores])
    exponentials = [jnp.exp(s - peak) for s in scores]
    total = sum(jnp.sum(e, axis=-1, keepdims=True) for e in exponentials)
    _record_weights(exponentials, total, num_sinks)
    attended = sum(_head_matmul(e.astype(v.dtype), v, right_contracting=2) for e, v in zip(exponentials, values))
    attended = (attended / total).transpose(0, 3, 1, 2, 4).reshape(queries.shape)  # -> [B, T, N, H]
    return attended.astype(new_values.dtype)  # a cache dtype must not leak into x


_WEIGHTS_SINK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("weights_sink", default=None)


@contextlib.contextmanager
def recording_weights(sink: Callable[[np.ndarray], None]) -> Iterator[None]:
    """While active, each traced `sink_window_attention` hands its softmax weights to `sink` on the host.

    `sink` receives, per call (so per layer, in order), weights [B, K, G, T, S + W + T] over the sink
    block then the window block (ring slots, then the chunk's own tokens), through an ordered
    `jax.debug.callback`, hence on a single device. Enter it inside the function being jitted, around
    the model call, so that only that trace records. Outside it attention costs nothing more.
    """
    token = _WEIGHTS_SINK.set(sink)
    try:
        yield
    finally:
        _WEIGHTS_SINK.reset(token)


def _record_weights(exponentials: list[jax.Array], total: jax.Array, num_sinks: int) -> None:
    """Hand the softmax weights (each block's exponentials over their `total`) to the active sink, if any."""
    sink = _WEIGHTS_SINK.get()
    if sink is not None:
        sinks, cache_slots, chunk = exponentials
        weights = jnp.concatenate([sinks, cache_slots[..., num_sinks:], chunk], axis=-1) / total  # sink slots: 0
        jax.debug.callback(sink, weights, ordered=True)


def _block_scores(
    queries, query_positions, key_positions, mask, head_dim_axis: int, keys, config: ModelConfig, scale: float
):
    """Masked scores [B, K, G, T, keys] in float32 of one key block: queries [B, K, G, T, H] and keys
    [B, K, keys, H] (`head_dim_axis` 3) or [B, K, H, keys] (2), both already rotated."""
    scores = _head_matmul(queries, keys, right_contracting=head_dim_axis) * scale
    if config.position == "alibi":
        slopes = config_alibi_slopes(config).reshape(config.num_kv_heads, -1)
        distance = query_positions[:, :, None] - key_positions[:, None, :]  # [B, T, keys]
        scores = scores - slopes[None, :, :, None, None] * distance[:, None, None].astype(jnp.float32)
    return jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)


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
