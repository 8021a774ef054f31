"""Streaming tokens through a model: the decode step, chunked prefill and the token-by-token route.

Letters: B streams, T tokens, V vocab.

All three feed tokens through `streamjax.model.transformer` and return logits and the advanced cache; they agree
exactly: `prefill` (chunks of many tokens) and `feed_tokens` (one token at a time inside one
`lax.scan`) give the same logits and leave the same cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from streamjax.model.cache import SinkCache
from streamjax.model.config import ModelConfig
from streamjax.model.jit import model_jit
from streamjax.model.transformer import ForwardOutput, apply, check_cache_dtype, check_tokens, forward


def step(params: dict, cache: SinkCache, tokens, config: ModelConfig) -> tuple[jax.Array, SinkCache]:
    """Feed tokens [B, T] (T = 1 to decode): logits [B, T, V] and the cache (donated: do not reuse it).

    Compiles once per (config, cache shape, T), so an unbounded stream of equal-sized steps compiles once.
    """
    out = forward(params, cache, tokens, config)
    return out.logits, out.cache


def prefill(
    params: dict,
    cache: SinkCache,
    tokens,
    config: ModelConfig,
    chunk_size: int = 256,
    logits: str = "all",
    lengths=None,
) -> tuple[jax.Array | None, SinkCache]:
    """Feed tokens [B, T] in chunks of `chunk_size` (exact for any T, also T beyond the cache).

    Returns the logits ("all": [B, T, V], equal to `feed_tokens`; "last": [B, V] of each stream's last
    token; "none": None) and the cache. `lengths` [B] (default all T) feeds stream b only its first
    lengths[b] tokens (a ragged batch, padded at the end; the padding never enters the cache, and
    its "all" logits mean nothing). Every chunk is padded to `chunk_size`, so all of them run one
    compiled program (with "last" or "none", each computes only its last logits).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if logits not in ("all", "last", "none"):
        raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    check_tokens(tokens, config, cache)
    length = np.shape(tokens)[1]
    lengths = np.full(np.shape(tokens)[0], length, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if lengths.shape != (np.shape(tokens)[0],) or not np.all((lengths >= 0) & (lengths <= length)):
        raise ValueError(f"lengths must be [batch] values in [0, {length}], got {lengths}")
    tokens = np.asarray(tokens, np.int32) if not isinstance(tokens, jax.Array) else tokens
    pieces, last = [], None
    for start in range(0, length, chunk_size):
        chunk, _ = pad_chunk(tokens[:, start : start + chunk_size], chunk_size)
        num_valid = np.clip(lengths - start, 0, chunk_size)
        out = forward(params, cache, chunk, config, num_valid=num_valid, logits="all" if logits == "all" else "last")
        cache = out.cache
        if logits == "all":
            pieces.append(out.logits)
        elif logits == "last":  # a stream's last token lies in the last chunk it has tokens in
            last = out.logits if last is None else jnp.where((num_valid > 0)[:, None], out.logits, last)
    if logits == "all":
        return jnp.concatenate(pieces, axis=1)[:, :length], cache
    return last, cache


def pad_chunk(tokens, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """tokens [B, n] (n <= chunk_size) padded with id 0 to [B, chunk_size], and the valid count [B]: a
    full chunk and a partial one call `forward` alike, so they share one compiled program.

    Host tokens are padded on the host: padding on device compiles a program for every n, and a chat or
    a server that meets prompts of every length would keep hundreds of them (measured: 636 MiB of
    resident memory for 200 lengths)."""
    batch, count = tokens.shape
    if isinstance(tokens, jax.Array):
        padded = jnp.zeros((batch, chunk_size), jnp.int32).at[:, :count].set(tokens.astype(jnp.int32))
    else:
        padded = np.zeros((batch, chunk_size), np.int32)
        padded[:, :count] = tokens
    return jnp.asarray(padded), jnp.full((batch,), count, jnp.int32)


@model_jit(static_argnames=("config", "logits"), donate_argnames="cache")
def _token_by_token(params, cache: SinkCache, tokens, targets, config: ModelConfig, logits: str):
    def one_token(cache, columns):
        column, target = columns
        out = apply(params, cache, column[:, None], config, targets=None if target is None else target[:, None])
        scores = out.logits[:, 0] if logits == "all" else None
        return out.cache, (scores, None if out.nll is None else out.nll[:, 0])

    columns = (tokens.T, None if targets is None else targets.T)
    cache, (scores, nll) = jax.lax.scan(one_token, cache, columns)
    swap = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)  # noqa: E731
    return ForwardOutput(swap(scores), cache, swap(nll), None)


def token_route(
    params: dict, cache: SinkCache, tokens, config: ModelConfig, *, targets=None, logits: str = "all"
) -> ForwardOutput:
    """The token route: tokens [B, T] one at a time in a single `lax.scan` dispatch, the exact reference
    of StreamingLLM evaluation (one forward per token, as in the paper). The cache is donated.

    Returns logits [B, T, V] ("all") or None ("none"), the cache, and the NLL [B, T] of `targets` if given.
    """
    check_tokens(tokens, config, cache)
    check_cache_dtype(params, cache)
    if targets is not None:
        check_tokens(targets, config, cache, name="targets")
    if logits not in ("all", "none"):
        raise ValueError(f"the token route returns logits 'all' or 'none', got {logits!r}")
    targets = None if targets is None else jnp.asarray(targets, jnp.int32)
    return _token_by_token(params, cache, jnp.asarray(tokens, jnp.int32), targets, config, logits)


def feed_tokens(params: dict, cache: SinkCache, tokens, config: ModelConfig) -> tuple[jax.Array, SinkCache]:
    """The token route's logits [B, T, V] and the cache (see `token_route`)."""
    out = token_route(params, cache, tokens, config)
    return out.logits, out.cache
