"""Streaming generation for B independent streams: ragged prompts, per-stream sampling and stops, and
the decode loop on device.

Letters: B streams, T prompt tokens, V vocab, C cache slots, N steps of a block.

`generate` runs a whole generation; its three pieces are public so a caller can drive them (show text
block by block, end an endless generation when it likes):

    state, first = start(params, cache, prompts, config, settings, stops)   prefill, first tokens
    state, block = decode_block(params, state, config, settings, stops, N)  N steps in one dispatch
    cache = finish(params, state, config)    every prompt and generated token in the cache

A stream's `pending` token is the one it sampled last and has not fed yet. Each step of the decode
loop (`lax.while_loop`, the state donated) feeds the pending token of every unfinished stream (the
others feed nothing: `num_valid` 0 leaves their cache as it is) and samples the next from the logits.
A token is final when it is an end id, completes a stop string or is the stream's `max_new_tokens`-th
(`stopping.StopConditions`); a final token is fed too, and its stream is finished then. So the cache
of a finished stream holds its prompt and everything it generated, ready for the next turn. The
repetition penalty reads the token ids the cache holds (`SinkCache.slot_tokens`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from streamjax.model import sharding
from streamjax.model.cache import SinkCache
from streamjax.model.config import ModelConfig
from streamjax.model.jit import CompileClock, model_jit
from streamjax.model.transformer import apply, check_cache_dtype, check_tokens, forward
from streamjax.stream import sampling, stopping
from streamjax.stream.feed import prefill


@flax.struct.dataclass
class DecodeState:
    """Where B streams stand in a generation (all arrays [B] but the cache).

    pending: int32 the token each stream sampled last and has not fed yet.
    generated: int32 tokens each stream has sampled (its pending one included).
    final: bool the pending token is the stream's last; finished: bool its last token has been fed.
    reason: int32 why the stream ends (index in `stopping.REASONS`; 0 while it goes on).
    stop_state: int32 the stop-string automaton's state.
    """

    cache: SinkCache
    pending: jax.Array
    generated: jax.Array
    final: jax.Array
    finished: jax.Array
    reason: jax.Array
    stop_state: jax.Array


@dataclasses.dataclass
class GenerationResult:
    """What `generate` returns: per stream its tokens (int32 [n_b]) and why it ended ("end_id",
    "stop_string", "max_new_tokens", or None when the caller stopped it); the cache holding every
    prompt and generated token; and timings (seconds, compile time apart)."""

    tokens: list[np.ndarray]
    reasons: list[str | None]
    cache: SinkCache
    stats: dict[str, float]


def check_prompts(
    prompts: Sequence[Sequence[int]], config: ModelConfig, cache: SinkCache
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, T] int32 padded with 0 at the end, lengths [B]) of one prompt per stream of `cache`;
    ValueError for an empty prompt, a non-integer or out-of-vocabulary id, or a batch that does not fit."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if len(prompts) != cache.batch_size:
        raise ValueError(
            f"{len(prompts)} prompts for a cache of {cache.batch_size} streams: give one prompt per stream"
        )
    lengths = np.asarray([len(prompt) for prompt in prompts], np.int32)
    if not lengths.all():
        raise ValueError(
            f"the prompt of stream {int(np.argmin(lengths))} is empty: every stream needs a token to start from"
        )
    tokens = np.zeros((len(prompts), int(lengths.max())), np.int64)
    for row, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"the prompt of stream {row} must be a list of integer token ids, got {prompt!r:.80}")
        tokens[row, : len(ids)] = ids
    check_tokens(tokens, config, cache, name="prompts")
    return tokens.astype(np.int32), lengths


def start(
    params: dict,
    cache: SinkCache,
    prompts: Sequence[Sequence[int]],
    config: ModelConfig,
    settings: sampling.SamplingSettings,
    stops: stopping.StopConditions,
    chunk_size: int = 256,
) -> tuple[DecodeState, np.ndarray, np.ndarray]:
    """Feed each stream its prompt (ragged, by the chunk route, only the last logits kept) and sample
    its first token. Returns the state, the first tokens [B] and which streams sampled one [B] (not
    those with max_new_tokens 0). The cache is donated."""
    tokens, lengths = check_prompts(prompts, config, cache)
    _check_batch(cache, settings, stops)
    check_cache_dtype(params, cache)
    logits, cache = prefill(params, cache, tokens, config, chunk_size, logits="last", lengths=lengths)
    state = DecodeState(cache, *_first_tokens(logits, cache.slot_tokens, cache.length, settings, stops))
    return state, sharding.to_host(state.pending), sharding.to_host(state.generated) > 0


def _check_batch(cache: SinkCache, settings: sampling.SamplingSettings, stops: stopping.StopConditions) -> None:
    for name, size in (("sampling settings", settings.batch_size), ("stop conditions", stops.max_new_tokens.shape[0])):
        if size != cache.batch_size:
            raise ValueError(f"the {name} are for {size} streams but the cache holds {cache.batch_size}")


@jax.jit
def _first_tokens(logits, slot_tokens, length, settings, stops) -> tuple[jax.Array, ...]:
    """The fields of `DecodeState` after each stream samples its first token (the cache apart)."""
    batch = logits.shape[0]
    wanted = stops.max_new_tokens > 0  # a stream allowed no token is finished before it starts
    nothing = jnp.zeros((batch,), jnp.int32)
    token, reason, stop_state = _sample(
        logits, slot_tokens, length, settings, stops, nothing, stopping.initial_state(batch)
    )
    pending, reason = jnp.where(wanted, token, 0), jnp.where(wanted, reason, 3)
    return pending, wanted.astype(jnp.int32), wanted & (reason > 0), ~wanted, reason, stop_state


def _sample(logits, slot_tokens, length, settings, stops, generated, stop_state):
    """(tokens [B], reason [B], automaton state [B]) of each stream's next token, its (generated+1)-th;
    the repetition penalty reads the tokens in the cache (slot_tokens [B, C], the first `length` filled)."""
    in_cache = jnp.arange(slot_tokens.shape[1])[None, :] < length[:, None]
    tokens = sampling.next_tokens(logits, settings, slot_tokens, in_cache, generated)
    reason, stop_state = stops.check(tokens, generated + 1, stop_state)
    return tokens, reason, stop_state


@model_jit(static_argnames=("config", "num_steps"), donate_argnames="state")
def _decode_block(params, state: DecodeState, settings, stops, config: ModelConfig, num_steps: int):
    batch = state.pending.shape[0]

    def step(carry):
        index, state, tokens, emitted = carry
        active = ~state.finished
        out = apply(
            params, state.cache, state.pending[:, None], config, num_valid=active.astype(jnp.int32), logits="last"
        )
        sampling_now = active & ~state.final
        new = out.cache
        token, reason, stop_state = _sample(
            out.logits, new.slot_tokens, new.length, settings, stops, state.generated, state.stop_state
        )
        state = state.replace(
            cache=out.cache,
            pending=jnp.where(sampling_now, token, state.pending),
            generated=state.generated + sampling_now,
            final=jnp.where(sampling_now, reason > 0, state.final),
            finished=state.finished | (active & state.final),
            reason=jnp.where(sampling_now, reason, state.reason),
            stop_state=jnp.where(sampling_now, stop_state, state.stop_state),
        )
        tokens = tokens.at[:, index].set(jnp.where(sampling_now, token, 0))
        return index + 1, state, tokens, emitted.at[:, index].set(sampling_now)

    def going(carry):
        index, state, _, _ = carry
        return (index < num_steps) & ~jnp.all(state.finished)

    empty = (jnp.zeros((batch, num_steps), jnp.int32), jnp.zeros((batch, num_steps), bool))
    _, state, tokens, emitted = jax.lax.while_loop(going, step, (0, state, *empty))
    return state, tokens, emitted


def decode_block(
    params: dict,
    state: DecodeState,
    config: ModelConfig,
    settings: sampling.SamplingSettings,
    stops: stopping.StopConditions,
    num_steps: int = 32,
) -> tuple[DecodeState, np.ndarray, np.ndarray]:
    """Up to `num_steps` decode steps on device in one dispatch (fewer once every stream is finished).

    Returns the state (the one passed in is donated), and the tokens [B, N] each stream sampled with
    a mask [B, N] of which are real: one transfer to the host per block, not per token.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    state, tokens, emitted = _decode_block(params, state, settings, stops, config, num_steps)
    return state, sharding.to_host(tokens), sharding.to_host(emitted)


def finish(params: dict, state: DecodeState, config: ModelConfig) -> SinkCache:
    """The cache once every stream's last sampled token is fed (streams a caller stopped early still
    hold a pending one), so it holds every prompt and generated token. The state is donated."""
    unfed = ~sharding.to_host(state.finished)
    if not unfed.any():
        return state.cache
    pending = state.pending[:, None]
    return forward(params, state.cache, pending, config, num_valid=unfed.astype(np.int32), logits="none").cache


def generate(
    params: dict,
    cache: SinkCache,
    prompts: Sequence[Sequence[int]],
    config: ModelConfig,
    settings: sampling.SamplingSettings | None = None,
    stops: stopping.StopConditions | None = None,
    *,
    chunk_size: int = 256,
    block_size: int = 32,
    on_tokens: Callable[[list[np.ndarray]], bool | None] | None = None,
) -> GenerationResult:
    """Generate for B streams from `prompts` (one list of token ids per stream of `cache`, any lengths).

    settings: `sampling.sampling_settings` (default greedy); stops: `stopping.stop_conditions`
    (default: 64 new tokens). `on_tokens(new)` receives each stream's new tokens (a list of B arrays)
    as they come, block by block; returning False ends the generation there (endless generation:
    `max_new_tokens=None` and a callback that says when). The cache is donated.
    """
    batch = cache.batch_size
    settings = sampling.sampling_settings(batch, temperature=0.0) if settings is None else settings
    stops = stopping.stop_conditions(batch, max_new_tokens=64) if stops is None else stops
    clock, started = CompileClock(), time.perf_counter()
    with clock:
        state, first, emitted = start(params, cache, prompts, config, settings, stops, chunk_size)
    prefill_seconds, prefill_compile = time.perf_counter() - started, clock.seconds
    tokens = [[int(token)] if sampled else [] for token, sampled in zip(first, emitted)]
    going = on_tokens is None or on_tokens([np.asarray(t, np.int32) for t in tokens]) is not False
    decode_started, steps = time.perf_counter(), 0
    with clock:
        while going and not sharding.to_host(state.finished).all():
            state, block, mask = decode_block(params, state, config, settings, stops, block_size)
            new = [row[row_mask] for row, row_mask in zip(block, mask)]
            for stream, row in enumerate(new):
                tokens[stream].extend(row.tolist())
            steps += int(mask.any(axis=0).sum())
            going = on_tokens is None or on_tokens(new) is not False
        reasons = [stopping.REASONS[code] for code in sharding.to_host(state.reason)]
        cache = finish(params, state, config)
        jax.block_until_ready(cache.length)
    stats = {
        "prefill_tokens": int(sum(len(prompt) for prompt in prompts)),
        "prefill_seconds": prefill_seconds,
        "prefill_compile_seconds": prefill_compile,
        "decode_tokens": int(sum(len(t) for t in tokens)),
        "decode_steps": steps,
        "decode_seconds": time.perf_counter() - decode_started,
        "decode_compile_seconds": clock.seconds - prefill_compile,
    }
    return GenerationResult([np.asarray(t, np.int32) for t in tokens], reasons, cache, stats)
