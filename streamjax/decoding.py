"""Streaming tokens through a model: the jitted step, the token-by-token route and chunked prefill.

Letters: B streams, T tokens, V vocab.

All three take params and a cache and return logits and the advanced cache; they agree exactly:
`prefill` (chunks of many tokens) and `feed_tokens` (one token at a time inside one `lax.scan`)
give the same logits and leave the same cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from streamjax import models
from streamjax.cache import SinkCache
from streamjax.compile import model_jit
from streamjax.config import ModelConfig


def check_tokens(tokens, config: ModelConfig, cache: SinkCache | None = None) -> None:
    """Raise ValueError for tokens that are not a [B, T] batch of integer ids inside the vocabulary.

    Ids are range-checked only for host input (numpy arrays, lists: the user boundary). A `jax.Array`
    (or tracer) gets the shape, dtype and batch checks alone, from its metadata: reading its values would
    copy it to the host, so an on-device decode loop would wait on every token.
    """
    on_device = isinstance(tokens, jax.Array)
    array = tokens if on_device else np.asarray(tokens)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"tokens must have shape [batch, length] with length >= 1, got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {array.dtype}")
    if cache is not None and array.shape[0] != cache.batch_size:
        raise ValueError(f"tokens have batch {array.shape[0]} but the cache holds {cache.batch_size} streams")
    if on_device:
        return
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")


@model_jit(static_argnames="config", donate_argnames="cache")
def _forward(params: dict, cache: SinkCache, tokens: jax.Array, config: ModelConfig):
    return models.family(config).forward(params, cache, tokens, config)


def step(params: dict, cache: SinkCache, tokens, config: ModelConfig) -> tuple[jax.Array, SinkCache]:
    """Feed tokens [B, T] (T = 1 to decode, more to prefill a chunk): logits [B, T, V] and the cache.

    Jitted with the cache donated: the cache passed in must not be used again. Compiles once per
    (config, cache shape, T), so an unbounded stream of equal-sized steps compiles once.
    """
    check_tokens(tokens, config, cache)
    return _forward(params, cache, jnp.asarray(tokens, jnp.int32), config)


@model_jit(static_argnames="config", donate_argnames="cache")
def _feed_tokens(params: dict, cache: SinkCache, tokens: jax.Array, config: ModelConfig):
    forward = models.family(config).forward

    def one_token(cache, column):
        logits, cache = forward(params, cache, column[:, None], config)
        return cache, logits[:, 0]

    cache, logits = jax.lax.scan(one_token, cache, tokens.T)
    return jnp.swapaxes(logits, 0, 1), cache


def feed_tokens(params: dict, cache: SinkCache, tokens, config: ModelConfig) -> tuple[jax.Array, SinkCache]:
    """The token route: tokens [B, T] one at a time in a single `lax.scan` dispatch -> logits [B, T, V].

    This is the exact reference of StreamingLLM evaluation (one forward per token, as the paper).
    The cache is donated.
    """
    check_tokens(tokens, config, cache)
    return _feed_tokens(params, cache, jnp.asarray(tokens, jnp.int32), config)


def prefill(
    params: dict, cache: SinkCache, tokens, config: ModelConfig, chunk_size: int = 256
) -> tuple[jax.Array, SinkCache]:
    """Feed tokens [B, T] in chunks of `chunk_size` (exact for any T, also T beyond the cache).

    Returns logits [B, T, V] and the cache; equals `feed_tokens` on the same tokens.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_tokens(tokens, config, cache)
    tokens = jnp.asarray(tokens, jnp.int32)
    outputs = []
    for start in range(0, tokens.shape[1], chunk_size):
        logits, cache = _forward(params, cache, tokens[:, start : start + chunk_size], config)
        outputs.append(logits)
    return jnp.concatenate(outputs, axis=1), cache
