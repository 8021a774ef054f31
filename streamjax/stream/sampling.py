"""Per-stream sampling of the next token for B independent streams, inside jit or a while_loop.

Letters: B streams, V vocabulary, C context tokens (the ids the repetition penalty looks at).

Every setting is an array [B] (`SamplingSettings`), so one compiled program serves any values and
every stream in a batch has its own. `sampling_settings` builds them on the host and refuses bad
values before anything is traced. `process_logits` follows transformers' processors of the same
names, with `min_tokens_to_keep=1` and filter value -inf, in the order `generate` applies them:

    RepetitionPenaltyLogitsProcessor   every stream (1 = off: the processor is then the identity)
    TemperatureLogitsWarper            sampling streams only (temperature > 0)
    TopKLogitsWarper                   sampling streams with top_k > 0
    TopPLogitsWarper                   sampling streams with top_p < 1
    MinPLogitsWarper                   sampling streams (min_p = 0 removes nothing)

A stream with temperature 0 is greedy, as `generate(do_sample=False)`: only the repetition penalty
applies and `sample` takes the argmax. Settings are float32; results equal transformers' processors
given the same float32 values. Where tied logits straddle the top-p boundary, transformers removes
whichever its sort (unstable for V > 16) puts first; here the lower ids are removed first, as with
torch's sort for V <= 16. Top-k and top-p find their thresholds by bisection over the logits'
bit patterns (32 passes over [B, V]) rather than a sort, which XLA runs slowly on CPU.

Each stream draws with its own key (`stream_keys`: `fold_in(key(seed), step)`), so its tokens depend
only on its seed, its step and its logits, not on what else is in the batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_INT32_MAX = 2**31 - 1


@flax.struct.dataclass
class SamplingSettings:
    """Sampling settings of B streams, each field an array [B]; build it with `sampling_settings`.

    temperature: float32, 0 = greedy (argmax of the repetition-penalized logits).
    top_k: int32, 0 = off.
    top_p: float32 in (0, 1], 1 = off.
    min_p: float32 in [0, 1], 0 = off.
    repetition_penalty: float32 > 0, 1 = off; > 1 discourages tokens in the context.
    seed: uint32, the stream's random seed (see `stream_keys`).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    seed: jax.Array

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]


# field -> (dtype, the rule a value must satisfy, how to say the rule)
_RULES = {
    "temperature": (np.float32, lambda v: v >= 0, "a finite number >= 0 (0 = greedy)"),
    "top_k": (np.int32, lambda v: 0 <= v <= _INT32_MAX, "an integer >= 0 (0 = off)"),
    "top_p": (np.float32, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "min_p": (np.float32, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = off)"),
    "repetition_penalty": (np.float32, lambda v: v > 0, "a finite number > 0 (1 = off)"),
    "seed": (np.uint32, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
}


def sampling_settings(
    batch_size: int,
    *,
    temperature: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    min_p: float | Sequence[float] = 0.0,
    repetition_penalty: float | Sequence[float] = 1.0,
    seed: int | Sequence[int] = 0,
) -> SamplingSettings:
    """Settings of `batch_size` streams; each argument is one value for all or a sequence of one per stream.

    Raises ValueError naming the field, the stream and the value for anything out of range, on the
    host, before any tracing or compilation (`check_sampling_settings`).
    """
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    given |= dict(repetition_penalty=repetition_penalty, seed=seed)
    fields = check_sampling_settings(batch_size, **given)
    return SamplingSettings(**{name: jnp.asarray(values) for name, values in fields.items()})


def check_sampling_settings(batch_size: int, **given) -> dict[str, np.ndarray]:
    """{field: [batch_size] host array} of the `sampling_settings` fields `given`, each checked against its
    rule (ValueError as `sampling_settings` raises); touches no device, so a program can check its config
    before `jax.distributed` starts (which must come before any JAX computation)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    unknown = sorted(set(given) - set(_RULES))
    if unknown:
        raise ValueError(f"unknown sampling settings {unknown}; the fields are {', '.join(_RULES)}")
    return {name: _per_stream(name, value, int(batch_size)) for name, value in given.items()}


def _per_stream(name: str, value, batch_size: int) -> np.ndarray:
    """The [batch_size] array of one field, every value checked against its rule."""
    dtype, rule, wanted = _RULES[name]
    if isinstance(value, np.ndarray | jax.Array):
        value = np.asarray(value).tolist()  # a Python scalar, or a list of one value per stream
    per_stream = isinstance(value, Sequence) and not isinstance(value, str)
    values = list(value) if per_stream else [value] * batch_size
    if len(values) != batch_size:
        raise ValueError(f"{name} has {len(values)} values for {batch_size} streams: {value!r}")
    is_valid = _is_finite_number if dtype == np.float32 else _is_integer
    for stream, item in enumerate(values):
        if not (is_valid(item) and rule(item)):
            where = f" of stream {stream}" if per_stream else ""
            raise ValueError(f"{name}{where} is {item!r}; it must be {wanted}")
    return np.asarray(values, dtype=dtype)


def _is_integer(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_finite_number(value) -> bool:
    return (_is_integer(value) or isinstance(value, float | np.floating)) and math.isfinite(value)


def context_token_mask(context: jax.Array, context_mask: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] bool: which tokens occur among the valid entries of `context` [B, C] (mask [B, C] bool).

    Ids outside [0, V) are ignored, as transformers ignores ids beyond the logits' vocabulary.
    """
    valid = context_mask & (context >= 0) & (context < vocab_size)
    ids = jnp.where(valid, context, vocab_size)
    rows = jnp.arange(context.shape[0])[:, None]
    return jnp.zeros((context.shape[0], vocab_size), bool).at[rows, ids].set(True, mode="drop")


def apply_repetition_penalty(
    logits: jax.Array, penalty: jax.Array, context: jax.Array, context_mask: jax.Array
) -> jax.Array:
    """RepetitionPenaltyLogitsProcessor: each distinct context token's logit x becomes x * p if x < 0, else x / p.

    logits [B, V] float32, penalty [B], context [B, C] int32 ids, context_mask [B, C] bool.
    """
    seen = context_token_mask(context, context_mask, logits.shape[-1])
    penalized = jnp.where(logits < 0, logits * penalty[:, None], _divide_rows(logits, penalty))
    return jnp.where(seen, penalized, logits)


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """TemperatureLogitsWarper: logits [B, V] / temperature [B]; streams with temperature 0 are left as they are."""
    return _divide_rows(logits, jnp.where(temperature > 0, temperature, 1.0))


def _divide_rows(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """x [B, V] / divisor [B], correctly rounded like torch's division.

    XLA rewrites x / broadcast(d) as x * broadcast(1 / d), which is an ulp off in about a third of
    the entries; the barrier hides the broadcast from that rewrite.
    """
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(divisor[:, None], x.shape))


def apply_top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """TopKLogitsWarper: -inf below the k-th largest logit (ties with it are kept); top_k [B], 0 = off."""
    keys = _ordered_keys(logits)
    k = jnp.clip(top_k, 1, logits.shape[-1]).astype(jnp.int32)[:, None]
    # The k-th largest key is the smallest t with fewer than k keys above it.
    kth_largest = _smallest_key(lambda t: jnp.sum(keys > t[:, None], axis=-1, keepdims=True) < k, len(logits))
    return jnp.where((keys < kth_largest[:, None]) & (top_k > 0)[:, None], -jnp.inf, logits)


def apply_top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """TopPLogitsWarper: -inf for the least likely tokens whose cumulative probability is <= 1 - top_p.

    top_p [B], 1 = off. Cumulative means in ascending order of logits, tied logits in ascending
    order of ids; the most likely token (the last in that order) is always kept.
    """
    keys, probs = _ordered_keys(logits), jax.nn.softmax(logits, axis=-1)
    cutoff = (1 - top_p)[:, None]
    # The boundary key: the smallest t whose tokens up to and including it hold more than 1 - top_p.
    mass_up_to = lambda t: jnp.sum(jnp.where(keys <= t[:, None], probs, 0.0), axis=-1, keepdims=True)
    boundary = _smallest_key(lambda t: mass_up_to(t) > cutoff, len(logits))[:, None]
    below = jnp.sum(jnp.where(keys < boundary, probs, 0.0), axis=-1, keepdims=True)
    cumulative_in_tie = below + jnp.cumsum(jnp.where(keys == boundary, probs, 0.0), axis=-1)
    nothing_crosses = mass_up_to(boundary[:, 0]) <= cutoff  # float rounding with top_p near 0: all go
    removed = (keys < boundary) | ((keys == boundary) & (cumulative_in_tie <= cutoff)) | nothing_crosses
    return jnp.where(removed & ~_is_last_largest(keys) & (top_p < 1)[:, None], -jnp.inf, logits)


def _is_last_largest(keys: jax.Array) -> jax.Array:
    """[B, V] bool: the largest key, the highest id among ties (the last of an ascending stable sort)."""
    ids = jnp.arange(keys.shape[-1])
    largest = keys == jnp.max(keys, axis=-1, keepdims=True)
    return ids == jnp.max(jnp.where(largest, ids, -1), axis=-1, keepdims=True)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """MinPLogitsWarper: -inf for tokens less likely than min_p [B] times the most likely one's probability."""
    probs = jax.nn.softmax(logits, axis=-1)
    removed = probs < min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(removed, -jnp.inf, logits)


def _ordered_keys(logits: jax.Array) -> jax.Array:
    """[B, V] uint32 keys in the order of the float32 logits (-0.0 equal to 0.0, -inf the smallest)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(logits == 0, 0.0, logits), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _smallest_key(predicate, batch_size: int) -> jax.Array:
    """[B] uint32: per row, the smallest key t for which `predicate(t)` ([B] -> [B, 1] bool, false then
    true as t grows) holds, or 2**32 - 1 if none does. A bisection: 32 halvings of the key range, each
    one pass over the logits, in place of a sort (XLA's sort on CPU takes ~20 ms per 49k-logit row)."""

    def halve(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        holds = predicate(middle)[:, 0]
        return jnp.where(holds, low, middle + 1), jnp.where(holds, middle, high)

    start = (jnp.zeros(batch_size, jnp.uint32), jnp.full(batch_size, 2**32 - 1, jnp.uint32))
    return jax.lax.fori_loop(0, 32, halve, start)[0]


def _warp(logits: jax.Array, settings: SamplingSettings) -> jax.Array:
    """Temperature, top-k, top-p, min-p, in generate's order; each skipped when no sampling stream uses it."""
    sampling = settings.temperature > 0
    logits = _where_any(sampling, apply_temperature, logits, settings.temperature)
    logits = _where_any(sampling & (settings.top_k > 0), apply_top_k, logits, settings.top_k)
    logits = _where_any(sampling & (settings.top_p < 1), apply_top_p, logits, settings.top_p)
    return _where_any(sampling & (settings.min_p > 0), apply_min_p, logits, settings.min_p)


def _where_any(used: jax.Array, process, logits: jax.Array, setting: jax.Array) -> jax.Array:
    """`process(logits, setting)` if any stream's `used` [B] is set, else the logits as they are (cheaper
    than processing with values that change nothing, which each processor would return unchanged)."""
    return jax.lax.cond(jnp.any(used), process, lambda logits, _: logits, logits, setting)


def process_logits(
    logits: jax.Array, settings: SamplingSettings, context: jax.Array, context_mask: jax.Array
) -> jax.Array:
    """[B, V] float32 logits processed as transformers' generate does (see the module docstring).

    logits [B, V] float32; context [B, C] int32 token ids the repetition penalty counts (each distinct
    id once), context_mask [B, C] bool which of them are valid. Greedy streams (temperature 0) get the
    repetition-penalized logits only.
    """
    _check_shapes(logits, settings, context, context_mask)
    penalty = functools.partial(apply_repetition_penalty, context=context, context_mask=context_mask)
    penalized = _where_any(settings.repetition_penalty != 1, penalty, logits, settings.repetition_penalty)
    return jnp.where((settings.temperature > 0)[:, None], _warp(penalized, settings), penalized)


def _check_shapes(logits, settings: SamplingSettings, context, context_mask) -> None:
    """Shape errors at trace time, before anything is compiled."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    batch_size = logits.shape[0]
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        if getattr(settings, name).shape != (batch_size,):
            raise ValueError(f"settings.{name} has shape {getattr(settings, name).shape}, logits have B={batch_size}")
    if context.ndim != 2 or context.shape[0] != batch_size or context_mask.shape != context.shape:
        raise ValueError(
            f"context {context.shape} and context_mask {context_mask.shape} must both be [B={batch_size}, C]"
        )


def stream_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """[B] PRNG keys: stream b's key at its generation step n is fold_in(key(seed[b]), step[b]).

    seed [B] uint32; step [B] or a scalar int32 (the index of the token being drawn in that stream).
    """
    step = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), seed.shape)
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seed, step)


def sample(logits: jax.Array, temperature: jax.Array, keys: jax.Array) -> jax.Array:
    """[B] int32 next tokens from processed logits [B, V]: a draw with keys[b] if temperature[b] > 0, else the argmax.

    Draws follow softmax(logits), as generate's multinomial does; -inf tokens are never drawn.
    """
    greedy = jnp.argmax(logits, axis=-1)
    draw = lambda: jnp.where(temperature > 0, jax.vmap(jax.random.categorical)(keys, logits), greedy)
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy).astype(jnp.int32)


def next_tokens(
    logits: jax.Array, settings: SamplingSettings, context: jax.Array, context_mask: jax.Array, step: jax.Array
) -> jax.Array:
    """[B] int32: `process_logits`, then `sample` with each stream's key at its `step` ([B] or scalar)."""
    processed = process_logits(logits, settings, context, context_mask)
    return sample(processed, settings.temperature, stream_keys(settings.seed, step))
