"""The sink ring KV cache and the cache-relative positions of StreamingLLM.

Letters: L layers, B streams, C capacity (= S + W), S sinks, W window, T new tokens, K kv heads,
H head dim.

A stream with `num_sinks=S, window=W` lets the token at stream index t attend to the first S tokens,
the W tokens before it, and itself. The cache holds exactly those S + W keys (stored before RoPE):

    slots [0, S)      the sinks, stream indices 0..S-1, written once
    slots [S, S + W)  a ring of the W most recent tokens; `cursor` is the slot to overwrite next

Positions are indices within the cache: sink s sits at position s, the window follows in stream
order, and the query sits at `min(t, S + W)`. Hence a window key sits at its true distance t - j from
the query and sink s at the distance `min(t, S + W) - s`. `plan_chunk` turns that into positions for
two key blocks that share one softmax: the sink block (queries at their cache position, sinks at s)
and the window block (every cache slot, its sink slots masked, followed by the new tokens; queries
and keys at their stream offset from the chunk start). All positions handed to attention are small
integers, so a stream may run forever: stream indices are int32 that wrap modulo 2^32 and are only
ever subtracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from streamjax.config import ModelConfig


@flax.struct.dataclass
class SinkCache:
    """KV cache of B independent streams, each with its own fill state.

    keys: one [B, K, H, C] array per layer (a tuple of L), before RoPE, head dim before slots: the
        score product reads each kv head's keys as one [H, C] matrix, the orientation in which XLA
        on CPU streams it (a [C, H] layout made that product twice as slow in a decode step).
    values: one [B, K, C, H] array per layer, each kv head's slots one [C, H] matrix.
        An array per layer, so that no layer's slots are copied out of a larger buffer.
    slot_positions: [B, C] int32 stream index of the token each slot holds (wrapping).
    length: [B] int32 number of filled slots, saturating at C; also the next query's position.
    cursor: [B] int32 ring slot (0..W-1) that the next window token overwrites.
    next_position: [B] int32 stream index of the next token (wrapping).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    slot_positions: jax.Array
    length: jax.Array
    cursor: jax.Array
    next_position: jax.Array
    num_sinks: int = flax.struct.field(pytree_node=False)
    window: int = flax.struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return self.num_sinks + self.window

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


def check_cache_shape(num_sinks: int, window: int) -> None:
    """Raise ValueError for a sink/window pair that does not describe a cache."""
    for name, value in (("num_sinks", num_sinks), ("window", window)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if num_sinks < 0:
        raise ValueError(f"num_sinks must be >= 0 (0 is plain window attention), got {num_sinks}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (the recent tokens kept besides the sinks), got {window}")


def init_cache(
    config: ModelConfig,
    batch_size: int,
    num_sinks: int,
    window: int,
    dtype: jnp.dtype = jnp.float32,
    first_position: int = 0,
) -> SinkCache:
    """An empty cache for `batch_size` streams; `first_position` labels the first token (any int)."""
    check_cache_shape(num_sinks, window)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    capacity = num_sinks + window
    keys_shape = (batch_size, config.num_kv_heads, config.head_dim, capacity)
    values_shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
    wrapped_first = (first_position + 2**31) % 2**32 - 2**31
    return SinkCache(
        keys=tuple(jnp.zeros(keys_shape, dtype) for _ in range(config.num_layers)),
        values=tuple(jnp.zeros(values_shape, dtype) for _ in range(config.num_layers)),
        slot_positions=jnp.zeros((batch_size, capacity), jnp.int32),
        length=jnp.zeros((batch_size,), jnp.int32),
        cursor=jnp.zeros((batch_size,), jnp.int32),
        next_position=jnp.full((batch_size,), wrapped_first, jnp.int32),
        num_sinks=num_sinks,
        window=window,
    )


class ChunkPlan(NamedTuple):
    """Where T new tokens go and what each of them sees; computed once per chunk, used by every layer.

    sink_query_positions: [B, T] cache position of each query, min(t, S + W).
    sink_mask: [B, T, S] query may see sink s (it exists and is not in the query's future).
    sink_sources: [B, S] index of the new token that becomes sink s, or T to keep the cached sink.
    window_query_positions: [B, T] offset of each query from the chunk start (0..T-1).
    window_key_positions: [B, C + T] offset of each cache slot, then each new token, from the chunk start.
    window_mask: [B, T, C + T] key is a filled ring slot or a new token that is not a sink, causal and
        at most W tokens back. (The window block spans every cache slot, sink slots always masked, so
        that attention reads the cache where it lies, then the chunk.)
    destinations: [B, T] cache slot each new token is written to, or C where it is not kept.
    """

    sink_query_positions: jax.Array
    sink_mask: jax.Array
    sink_sources: jax.Array
    window_query_positions: jax.Array
    window_key_positions: jax.Array
    window_mask: jax.Array
    destinations: jax.Array


def plan_chunk(cache: SinkCache, num_new: int) -> ChunkPlan:
    """Positions, masks and destinations for feeding `num_new` tokens to every stream of `cache`."""
    return jax.vmap(lambda *state: _plan_stream(*state, cache.num_sinks, cache.window, num_new))(
        cache.slot_positions, cache.length, cache.cursor, cache.next_position
    )


def _plan_stream(slot_positions, length, cursor, next_position, num_sinks, window, num_new) -> ChunkPlan:
    capacity = num_sinks + window
    new = jnp.arange(num_new, dtype=jnp.int32)
    seen_before = length + new  # tokens before each new one, exact while the cache is filling
    sinks = jnp.arange(num_sinks, dtype=jnp.int32)

    slot_offsets = slot_positions - next_position  # wrapping difference; ring slots in [-W, 0)
    slots = jnp.arange(capacity)
    ring_filled = (slots >= num_sinks) & (slots < length)  # sink slots belong to the sink block only
    new_is_sink = seen_before < num_sinks
    key_offsets = jnp.concatenate([slot_offsets, new])
    key_usable = jnp.concatenate([ring_filled, ~new_is_sink])
    distance = new[:, None] - key_offsets[None, :]
    window_mask = key_usable[None, :] & (distance >= 0) & (distance <= window)

    first_ring_token = jnp.minimum(jnp.maximum(num_sinks - length, 0), num_new)
    ring_slot = num_sinks + (cursor + new - first_ring_token) % window
    kept = new >= num_new - window
    destinations = jnp.where(new_is_sink, seen_before, jnp.where(kept, ring_slot, capacity))
    sink_sources = jnp.where((sinks >= length) & (sinks < length + num_new), sinks - length, num_new)
    return ChunkPlan(
        sink_query_positions=jnp.minimum(seen_before, capacity),
        sink_mask=sinks[None, :] <= seen_before[:, None],
        sink_sources=sink_sources,
        window_query_positions=new,
        window_key_positions=key_offsets,
        window_mask=window_mask,
        destinations=destinations,
    )


def advance(
    cache: SinkCache, plan: ChunkPlan, new_keys: Sequence[jax.Array], new_values: Sequence[jax.Array]
) -> SinkCache:
    """The cache after a chunk whose keys (before RoPE) and values are `new_keys`, `new_values`: one
    [B, K, T, H] array per layer."""
    num_new = plan.destinations.shape[1]
    new_positions = cache.next_position[:, None] + jnp.arange(num_new, dtype=jnp.int32)
    first_ring_token = jnp.minimum(jnp.maximum(cache.num_sinks - cache.length, 0), num_new)
    return cache.replace(
        keys=tuple(_write_slots(old, plan.destinations, new, slot_axis=3) for old, new in zip(cache.keys, new_keys)),
        values=tuple(_write_slots(old, plan.destinations, new) for old, new in zip(cache.values, new_values)),
        slot_positions=_write_slots(cache.slot_positions, plan.destinations, new_positions),
        length=jnp.minimum(cache.length + num_new, cache.capacity),
        cursor=(cache.cursor + num_new - first_ring_token) % cache.window,
        next_position=cache.next_position + num_new,
    )


def sink_block(cached_sinks: jax.Array, new: jax.Array, plan: ChunkPlan) -> jax.Array:
    """The sink block [B, K, S, H] of one layer's keys (or values) as the chunk's queries see it.

    cached_sinks: [B, K, S, H] this layer's sink slots before the chunk; new: [B, K, T, H] the chunk's
    entries. Sinks still empty before the chunk are taken from the new tokens that become them.
    """
    padded_new = jnp.concatenate([new, jnp.zeros_like(new[:, :, :1])], axis=2)
    from_new = jnp.take_along_axis(padded_new, plan.sink_sources[:, None, :, None], axis=2)
    keep_cached = (plan.sink_sources == new.shape[2])[:, None, :, None]
    return jnp.where(keep_cached, cached_sinks, from_new)


def _write_slots(buffer: jax.Array, destinations: jax.Array, new: jax.Array, slot_axis: int = 2) -> jax.Array:
    """Write `new` into `buffer` at slots `destinations` [B, T]: one layer's values [B, K, C, H] or
    keys [B, K, H, C] (`slot_axis` 3) from [B, K, T, H], or slot positions [B, C] from [B, T].

    Destinations are in range and distinct; tokens that are not kept point one past the end and are
    dropped, so no write ever wraps or clamps. With the cache donated, XLA updates it in place.
    """
    batch = jnp.arange(destinations.shape[0])
    if buffer.ndim == destinations.ndim:
        index = (batch[:, None], destinations)
    else:  # advanced indices around a slice: the indexed view is [B, K, T, H] for either layout
        heads = jnp.arange(buffer.shape[1])
        slots = destinations[:, None, :]
        index = (batch[:, None, None], heads[None, :, None], *((slots,) if slot_axis == 2 else (slice(None), slots)))
    return buffer.at[index].set(new.astype(buffer.dtype), mode="drop", unique_indices=True)
