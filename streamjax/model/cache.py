"""The sink ring KV cache, and the plan of one chunk through it (positions, masks, where tokens go).

Letters: B streams, C capacity (= S + W), S sinks, W window, T new tokens, K kv heads, H head dim,
R rotary dims.

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

Without a cache (`cache=None`) a chunk is a plain causal pass from position 0: no sink block, no cache
slots, every earlier token of the chunk in the window block (within `sliding_window` on sliding
layers). Training and re-computation use it.

Hybrid models (`ModelConfig.layer_types`, e.g. Gemma 3's five sliding layers to one full layer) keep a
cache per layer type. The full-attention layers keep the StreamingLLM cache above (S + W, the
`SinkCache` itself); the sliding layers, which the model itself limits to its `sliding_window` w (keys
seen, itself included), keep their own ring in `SinkCache.sliding`: by default no sinks and the w - 1
tokens before the query, which is exactly the model's own sliding attention, or with `sliding_sinks`
sinks besides (an ablation). Each layer type is planned once per chunk with its own fill state and its
own RoPE (`plan_layers`), and written with its own destinations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from streamjax.model.config import ModelConfig
from streamjax.model.positions import rope_frequencies, rope_rotation


def _axes(*names: str) -> dict:
    """Field metadata naming the logical axes of an array field (read by `SinkCache.logical_axes`)."""
    return {"axes": names}


@flax.struct.dataclass
class SinkCache:
    """KV cache of B independent streams, each with its own fill state.

    keys: one [B, K, H, C] array per layer (a tuple of L), before RoPE, head dim before slots: the
        score product reads each kv head's keys as one [H, C] matrix, the orientation in which XLA
        on CPU streams it (a [C, H] layout made that product twice as slow in a decode step).
    values: one [B, K, C, H] array per layer, each kv head's slots one [C, H] matrix.
        An array per layer, so that no layer's slots are copied out of a larger buffer.
    slot_positions: [B, C] int32 stream index of the token each slot holds (wrapping).
    slot_tokens: [B, C] int32 token id each slot holds.
    With layer types (`ModelConfig.layer_types`), keys and values hold the full-attention layers only
    (in layer order) and `sliding` is the sliding layers' cache: a `SinkCache` of the same streams with
    its own sinks, window and fill state, and the sliding layers' keys and values. `layer_types` is the
    config's (static); None for a model without layer types.
    length: [B] int32 number of filled slots, saturating at C; also the next query's position.
    cursor: [B] int32 ring slot (0..W-1) that the next window token overwrites.
    next_position: [B] int32 stream index of the next token (wrapping).
    Slots at or past `length` hold nothing (zeros).
    """

    keys: tuple[jax.Array, ...] = flax.struct.field(metadata=_axes("batch", "kv_heads", "head_dim", "slots"))
    values: tuple[jax.Array, ...] = flax.struct.field(metadata=_axes("batch", "kv_heads", "slots", "head_dim"))
    slot_positions: jax.Array = flax.struct.field(metadata=_axes("batch", "slots"))
    slot_tokens: jax.Array = flax.struct.field(metadata=_axes("batch", "slots"))
    length: jax.Array = flax.struct.field(metadata=_axes("batch"))
    cursor: jax.Array = flax.struct.field(metadata=_axes("batch"))
    next_position: jax.Array = flax.struct.field(metadata=_axes("batch"))
    num_sinks: int = flax.struct.field(pytree_node=False)
    window: int = flax.struct.field(pytree_node=False)
    sliding: SinkCache | None = None
    layer_types: tuple[str, ...] | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def capacity(self) -> int:
        return self.num_sinks + self.window

    @property
    def num_slots(self) -> int:
        """Key (and value) slots of one stream over all layers: every layer's capacity, summed."""
        own = sum(keys.shape[-1] for keys in self.keys)
        return own + (0 if self.sliding is None else self.sliding.num_slots)

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the keys and values."""
        return (self.keys or self.sliding.keys)[0].dtype

    @property
    def batch_size(self) -> int:
        return self.slot_positions.shape[0]

    @classmethod
    def logical_axes(cls) -> dict[str, tuple[str, ...]]:
        """Logical axis names of every array field (of each layer's array for keys and values)."""
        return {field.name: field.metadata["axes"] for field in dataclasses.fields(cls) if "axes" in field.metadata}


def check_cache_shape(num_sinks: int, window: int, names: tuple[str, str] = ("num_sinks", "window")) -> None:
    """Raise ValueError for a sink/window pair that does not describe a cache (called `names` in errors)."""
    for name, value in zip(names, (num_sinks, window)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if num_sinks < 0:
        raise ValueError(f"{names[0]} must be >= 0 (0 is plain window attention), got {num_sinks}")
    if window < 1:
        raise ValueError(f"{names[1]} must be >= 1 (the recent tokens kept besides the sinks), got {window}")


def layer_indices(config: ModelConfig, layer_type: str) -> list[int]:
    """The layers of `config` of one layer type, in order."""
    return [i for i, kind in enumerate(config.layer_type_of) if kind == layer_type]


def check_sliding_cache(config: ModelConfig, sliding_sinks: int, sliding_window: int | None) -> int:
    """The ring size of the sliding layers' cache (`sliding_window`, default the model's w - 1); raise
    ValueError for a ring the model's sliding attention does not allow, or sinks without sliding layers."""
    if not layer_indices(config, "sliding_attention"):
        if sliding_sinks or sliding_window is not None:
            raise ValueError(
                f"sliding_sinks={sliding_sinks}, sliding_window={sliding_window} given, but no layer of this "
                f"{config.family} model is a sliding layer (layer_types {config.layer_types}): leave them unset"
            )
        return 0
    own = config.sliding_window - 1
    if own < 1:
        raise ValueError(
            f"sliding_window={config.sliding_window}: a sliding layer that sees only its own token keeps no cache; "
            "streamjax needs sliding_window >= 2"
        )
    ring = own if sliding_window is None else sliding_window
    check_cache_shape(sliding_sinks, ring, names=("sliding_sinks", "sliding_window"))
    if ring > own:
        raise ValueError(
            f"sliding_window={ring} asks the sliding layers to keep more tokens than the model lets them see: its "
            f"sliding attention covers the {own} tokens before the query (config sliding_window "
            f"{config.sliding_window}, itself included). Use a ring of at most {own} (default: exactly {own}, "
            "the model's own attention)."
        )
    return ring


def init_cache(
    config: ModelConfig,
    batch_size: int,
    num_sinks: int,
    window: int,
    dtype: jnp.dtype = jnp.float32,
    first_position: int = 0,
    *,
    sliding_sinks: int = 0,
    sliding_window: int | None = None,
) -> SinkCache:
    """An empty cache for `batch_size` streams, keys and values in `dtype`; `first_position` labels
    the first token (any int, wrapped to int32).

    `num_sinks` and `window` are the full-attention layers' S and W. A model with sliding layers keeps
    theirs in `SinkCache.sliding`: `sliding_sinks` sinks (default 0) and a ring of `sliding_window` tokens
    (default w - 1, the model's own sliding attention; smaller is an ablation, larger is refused).
    """
    check_cache_shape(num_sinks, window)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ring = check_sliding_cache(config, sliding_sinks, sliding_window)
    full_layers = len(layer_indices(config, "full_attention"))
    cache = _empty_cache(config, batch_size, num_sinks, window, full_layers, dtype, first_position)
    if ring == 0:
        return cache
    sliding_layers = config.num_layers - full_layers
    sliding = _empty_cache(config, batch_size, sliding_sinks, ring, sliding_layers, dtype, first_position)
    return cache.replace(sliding=sliding, layer_types=config.layer_type_of)


def _empty_cache(config, batch_size, num_sinks, window, num_layers, dtype, first_position) -> SinkCache:
    capacity = num_sinks + window
    keys_shape = (batch_size, config.num_kv_heads, config.head_dim, capacity)
    values_shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
    wrapped_first = (first_position + 2**31) % 2**32 - 2**31
    return SinkCache(
        keys=tuple(jnp.zeros(keys_shape, dtype) for _ in range(num_layers)),
        values=tuple(jnp.zeros(values_shape, dtype) for _ in range(num_layers)),
        slot_positions=jnp.zeros((batch_size, capacity), jnp.int32),
        slot_tokens=jnp.zeros((batch_size, capacity), jnp.int32),
        length=jnp.zeros((batch_size,), jnp.int32),
        cursor=jnp.zeros((batch_size,), jnp.int32),
        next_position=jnp.full((batch_size,), wrapped_first, jnp.int32),
        num_sinks=num_sinks,
        window=window,
    )


@flax.struct.dataclass
class ChunkPlan:
    """Where T new tokens go and what each of them sees; built once per chunk, read by every layer.

    sink_query_positions: [B, T] cache position of each query, min(t, S + W).
    sink_mask: [B, T, S] query may see sink s (it exists and is not in the query's future).
    sink_sources: [B, S] index of the new token that becomes sink s, or T to keep the cached sink.
    window_query_positions: [B, T] offset of each query from the chunk start (0..T-1).
    window_key_positions: [B, C + T] offset of each cache slot, then each new token, from the chunk start.
    window_mask: [B, T, C + T] key is a filled ring slot or a valid new token that is not a sink,
        causal and at most W tokens back. (The window block spans every cache slot, sink slots always
        masked, so that attention reads the cache where it lies, then the chunk.)
    destinations: [B, T] cache slot each new token is written to, or C where it is not kept.
    num_valid: [B] int32 how many of the T tokens each stream really feeds (the rest is padding).
    rotations: RoPE cos and sin of (sink queries, sinks, window queries, cache slots, chunk keys),
        each [B, P, R/2] but the cache slots' [B, R/2, C] (the cache's key layout); None for ALiBi.
    num_sinks, capacity: the cache's S and C (static; both 0 without a cache).
    """

    sink_query_positions: jax.Array
    sink_mask: jax.Array
    sink_sources: jax.Array
    window_query_positions: jax.Array
    window_key_positions: jax.Array
    window_mask: jax.Array
    destinations: jax.Array
    num_valid: jax.Array
    rotations: tuple | None
    num_sinks: int = flax.struct.field(pytree_node=False)
    capacity: int = flax.struct.field(pytree_node=False)

    @property
    def sink_key_positions(self) -> jax.Array:
        """[B, S] the sinks' cache positions 0..S-1."""
        return jnp.broadcast_to(jnp.arange(self.num_sinks), (self.sink_mask.shape[0], self.num_sinks))


def plan_chunk(
    cache: SinkCache | None,
    batch_size: int,
    num_new: int,
    config: ModelConfig,
    num_valid: jax.Array | None = None,
    layer_type: str = "full_attention",
) -> ChunkPlan:
    """The plan of feeding `num_new` tokens to every stream of `cache` (or, for None, a causal pass
    over a fresh chunk) for the layers of `layer_type`, with their RoPE; stream b feeds only its first
    `num_valid[b]` tokens (default: all)."""
    if num_valid is None:
        num_valid = jnp.full((batch_size,), num_new, jnp.int32)
    if cache is None:  # no slots; every earlier token of the chunk within the layer's reach is in the window
        window = config.sliding_window - 1 if layer_type == "sliding_attention" else num_new
        num_sinks, slots = 0, jnp.zeros((batch_size, 0), jnp.int32)
        fill = (slots, *(jnp.zeros((batch_size,), jnp.int32) for _ in range(3)))
    else:
        num_sinks, window = cache.num_sinks, cache.window
        fill = (cache.slot_positions, cache.length, cache.cursor, cache.next_position)
    plan_stream = lambda *state: _plan_stream(*state, num_sinks=num_sinks, window=window, num_new=num_new)  # noqa: E731
    fields = jax.vmap(plan_stream)(*fill, num_valid)
    capacity = fill[0].shape[1]
    rotations = _rope_rotations(fields, config, layer_type, num_sinks, window, capacity, num_new)
    return ChunkPlan(**fields, num_valid=num_valid, rotations=rotations, num_sinks=num_sinks, capacity=capacity)


def _plan_stream(slot_positions, length, cursor, next_position, num_valid, *, num_sinks, window, num_new) -> dict:
    capacity = slot_positions.shape[0]
    new = jnp.arange(num_new, dtype=jnp.int32)
    valid = new < num_valid
    seen_before = length + new  # tokens before each new one, exact while the cache is filling
    sinks = jnp.arange(num_sinks, dtype=jnp.int32)

    slot_offsets = slot_positions - next_position  # wrapping difference; ring slots in [-W, 0)
    slots = jnp.arange(capacity)
    ring_filled = (slots >= num_sinks) & (slots < length)  # sink slots belong to the sink block only
    new_is_sink = valid & (seen_before < num_sinks)
    key_offsets = jnp.concatenate([slot_offsets, new])
    key_usable = jnp.concatenate([ring_filled, valid & ~new_is_sink])
    distance = new[:, None] - key_offsets[None, :]
    window_mask = key_usable[None, :] & (distance >= 0) & (distance <= window)

    first_ring_token = jnp.clip(num_sinks - length, 0, num_valid)
    ring_slot = num_sinks + (cursor + new - first_ring_token) % window
    kept = valid & (new >= num_valid - window)
    destinations = jnp.where(new_is_sink, seen_before, jnp.where(kept, ring_slot, capacity))
    sink_sources = jnp.where((sinks >= length) & (sinks < length + num_valid), sinks - length, num_new)
    return dict(
        sink_query_positions=jnp.minimum(seen_before, capacity),
        sink_mask=sinks[None, :] <= seen_before[:, None],
        sink_sources=sink_sources,
        window_query_positions=new,
        window_key_positions=key_offsets,
        window_mask=window_mask,
        destinations=destinations,
    )


def _rope_rotations(fields: dict, config: ModelConfig, layer_type: str, num_sinks, window, capacity, num_new):
    """RoPE tables of the plan's five position sets (see `ChunkPlan.rotations`); None for ALiBi."""
    if config.position != "rope":
        return None
    # Sink-block positions lie in [0, S + W]; window-block offsets from the chunk start in [-W, T).
    inv_freq, last = rope_frequencies(config, layer_type), max(capacity, num_new)
    batch = fields["sink_query_positions"].shape[0]
    sink_keys = jnp.broadcast_to(jnp.arange(num_sinks), (batch, num_sinks))
    key_offsets = fields["window_key_positions"]
    positions = (
        fields["sink_query_positions"],
        sink_keys,
        fields["window_query_positions"],
        key_offsets[:, :capacity],
        key_offsets[:, capacity:],
    )
    return tuple(rope_rotation(p, -window, last, inv_freq, dims_last=block != 3) for block, p in enumerate(positions))


def plan_layers(
    cache: SinkCache | None, batch_size: int, num_new: int, config: ModelConfig, num_valid: jax.Array | None = None
) -> dict[str, ChunkPlan]:
    """The chunk's plan per layer type: "full_attention" (always: it also moves the fill state of the
    `SinkCache` itself) and "sliding_attention" where the model has sliding layers."""
    kinds = {"full_attention", *config.layer_type_of}
    return {kind: plan_chunk(_type_cache(cache, kind), batch_size, num_new, config, num_valid, kind) for kind in kinds}


def _type_cache(cache: SinkCache | None, layer_type: str) -> SinkCache | None:
    """The cache that holds the layers of `layer_type`: the sliding layers' own where the cache has one."""
    return cache if cache is None or layer_type == "full_attention" else cache.sliding


def layer_entries(cache: SinkCache, config: ModelConfig) -> list[tuple[jax.Array, jax.Array]]:
    """(keys, values) of every layer, in layer order, each from the cache of its layer type."""
    check_layout(cache, config)
    parts = {"full_attention": cache, "sliding_attention": cache.sliding}
    entries = {kind: iter(zip(part.keys, part.values)) for kind, part in parts.items() if part is not None}
    return [next(entries[kind]) for kind in config.layer_type_of]


def check_layout(cache: SinkCache, config: ModelConfig) -> None:
    """Raise ValueError when `cache` was not made for `config`'s layers (`init_cache(config, ...)`)."""
    sliding = len(layer_indices(config, "sliding_attention"))
    held = (len(cache.keys), 0 if cache.sliding is None else len(cache.sliding.keys))
    if held != (config.num_layers - sliding, sliding):
        raise ValueError(
            f"the cache holds {held[0]} full-attention and {held[1]} sliding layers but the model has "
            f"{config.num_layers - sliding} and {sliding}: make the cache with init_cache(config, ...) for this model"
        )


def write_layers(
    cache: SinkCache,
    plans: dict[str, ChunkPlan],
    tokens: jax.Array,
    config: ModelConfig,
    new_keys: Sequence[jax.Array],
    new_values: Sequence[jax.Array],
) -> SinkCache:
    """The cache after the chunk `tokens` [B, T]: `write_chunk` into each layer type's cache, with that
    type's plan and its layers' new keys and values (one [B, K, T, H] array per layer, in layer order)."""

    def of_type(kind: str, arrays: Sequence[jax.Array]) -> list[jax.Array]:
        return [array for array, layer_kind in zip(arrays, config.layer_type_of, strict=True) if layer_kind == kind]

    written = {
        kind: write_chunk(layer_cache, plans[kind], tokens, of_type(kind, new_keys), of_type(kind, new_values))
        for kind in plans
        if (layer_cache := _type_cache(cache, kind)) is not None
    }
    return written["full_attention"].replace(sliding=written.get("sliding_attention"))


def write_chunk(
    cache: SinkCache, plan: ChunkPlan, tokens: jax.Array, new_keys: Sequence[jax.Array], new_values: Sequence[jax.Array]
) -> SinkCache:
    """The cache after the chunk `tokens` [B, T] whose keys (before RoPE) and values are `new_keys`,
    `new_values`: one [B, K, T, H] array per layer. Padding tokens (past `plan.num_valid`) are not kept."""
    num_valid = plan.num_valid
    new_positions = cache.next_position[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    first_ring_token = jnp.clip(cache.num_sinks - cache.length, 0, num_valid)
    return cache.replace(
        keys=tuple(_write_slots(old, plan.destinations, new, slot_axis=3) for old, new in zip(cache.keys, new_keys)),
        values=tuple(_write_slots(old, plan.destinations, new) for old, new in zip(cache.values, new_values)),
        slot_positions=_write_slots(cache.slot_positions, plan.destinations, new_positions),
        slot_tokens=_write_slots(cache.slot_tokens, plan.destinations, tokens.astype(jnp.int32)),
        length=jnp.minimum(cache.length + num_valid, cache.capacity),
        cursor=(cache.cursor + num_valid - first_ring_token) % cache.window,
        next_position=cache.next_position + num_valid,
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
    keys [B, K, H, C] (`slot_axis` 3) from [B, K, T, H], or a per-slot array [B, C] from [B, T].

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
