"""Streaming perplexity: per-token negative log-likelihood of a long text under the paper's methods.

Methods (S sinks, W window, so every method sees at most S + W earlier tokens except `dense`):
    dense      no eviction: the cache holds the whole text.
    window     window attention: no sinks, the last S + W tokens (same cache size as streaming).
    streaming  StreamingLLM: the first S tokens and the last W tokens.
    recompute  sliding window with re-computation: each token's logits from a fresh forward pass
               over the previous S + W tokens.

Routes for the cached methods: `chunk` feeds `chunk_size` tokens per forward pass (exact, see
`streamjax.cache`), `token` feeds one token at a time in a `lax.scan` (the reference). Evaluation
advances in segments so a long run can report progress and be checkpointed between segments.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from streamjax import models
from streamjax.cache import SinkCache, check_cache_shape, init_cache
from streamjax.compile import model_jit
from streamjax.config import ModelConfig
from streamjax.decoding import check_tokens

METHODS = ("dense", "window", "streaming", "recompute")
ROUTES = ("chunk", "token")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: a method, the cache budget S + W and how tokens are fed."""

    method: str = "streaming"
    num_sinks: int = 4
    window: int = 1020
    route: str = "chunk"
    chunk_size: int = 512

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.route not in ROUTES:
            raise ValueError(f"unknown route {self.route!r}; choose one of {', '.join(ROUTES)}")
        check_cache_shape(self.num_sinks, self.window)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def cache_shape(self, num_tokens: int) -> tuple[int, int]:
        """(num_sinks, window) of the cache this method streams through for a text of `num_tokens`."""
        if self.method == "dense":
            return 0, max(num_tokens, 1)
        if self.method == "window":
            return 0, self.num_sinks + self.window
        return self.num_sinks, self.window


@dataclasses.dataclass
class EvalState:
    """Where an evaluation stands: tokens fed so far and the cache they left (None for recompute)."""

    position: int
    cache: SinkCache | None


def params_dtype(params: dict) -> jnp.dtype:
    """The dtype params were loaded in (all leaves share it), which caches default to."""
    return jax.tree.leaves(params)[0].dtype


def init_state(config: ModelConfig, spec: EvalSpec, num_tokens: int, dtype) -> EvalState:
    """The state before the first token of a text of `num_tokens` tokens, its cache in `dtype`.

    Pass the params' dtype (`params_dtype(params)`) unless the cache is meant to differ. The cache is
    on the default device; `sharding.shard_cache` moves it onto a mesh.
    """
    if spec.method == "recompute":
        return EvalState(position=0, cache=None)
    num_sinks, window = spec.cache_shape(num_tokens)
    return EvalState(position=0, cache=init_cache(config, 1, num_sinks, window, dtype))


def check_text_tokens(tokens: np.ndarray, config: ModelConfig) -> np.ndarray:
    """The text as int32 [T] after checking it has at least two tokens, all in the vocabulary."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.shape[0] < 2:
        raise ValueError(f"the text must have at least two tokens to predict one, got shape {tokens.shape}")
    check_tokens(tokens[None], config)
    return tokens.astype(np.int32)


def advance(
    params: dict, config: ModelConfig, tokens: np.ndarray, spec: EvalSpec, state: EvalState, num_predictions: int
) -> tuple[EvalState, np.ndarray]:
    """Predict the next `num_predictions` tokens of `tokens` [T]: new state and float32 NLL per token.

    The token at `state.position` predicts `tokens[position + 1]`; a text of T tokens has T - 1
    predictions. The cache of `state` is donated.
    """
    stop = min(state.position + num_predictions, tokens.shape[0] - 1)
    inputs, targets = tokens[state.position : stop], tokens[state.position + 1 : stop + 1]
    if spec.method == "recompute":
        nll = _recompute_nll(params, config, tokens, spec, state.position, stop)
        return EvalState(stop, None), nll
    if spec.route == "token":
        nll, cache = _scan_nll(params, state.cache, inputs[None], targets[None], config)
        return EvalState(stop, cache), np.asarray(nll[0], np.float32)
    cache, pieces = state.cache, []
    for start in range(0, inputs.shape[0], spec.chunk_size):
        piece = slice(start, start + spec.chunk_size)
        nll, cache = _chunk_nll(params, cache, inputs[None, piece], targets[None, piece], config)
        pieces.append(nll[0])
    return EvalState(stop, cache), np.asarray(jnp.concatenate(pieces), np.float32)


def evaluate(params: dict, config: ModelConfig, tokens, spec: EvalSpec, dtype=None) -> np.ndarray:
    """Float32 NLL [T - 1] of every next-token prediction over `tokens` [T], in one go.

    The cache is in `dtype`, by default the params' dtype (bfloat16 params: a bfloat16 cache).
    """
    tokens = check_text_tokens(tokens, config)
    state = init_state(config, spec, tokens.shape[0], params_dtype(params) if dtype is None else dtype)
    _, nll = advance(params, config, tokens, spec, state, tokens.shape[0])
    return nll


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] as logsumexp minus the target's logit: no [..., V] array of
    log-probabilities is written, only the reductions over V."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


@model_jit(static_argnames="config", donate_argnames="cache")
def _chunk_nll(params, cache: SinkCache, inputs, targets, config: ModelConfig):
    logits, cache = models.family(config).forward(params, cache, inputs, config)
    return _token_nll(logits, targets), cache


@model_jit(static_argnames="config", donate_argnames="cache")
def _scan_nll(params, cache: SinkCache, inputs, targets, config: ModelConfig):
    forward = models.family(config).forward

    def one_token(cache, columns):
        column_inputs, column_targets = columns
        logits, cache = forward(params, cache, column_inputs[:, None], config)
        return cache, _token_nll(logits[:, 0], column_targets)

    cache, nll = jax.lax.scan(one_token, cache, (inputs.T, targets.T))
    return nll.T, cache


def _recompute_nll(params, config: ModelConfig, tokens: np.ndarray, spec: EvalSpec, start: int, stop: int):
    """Each position t in [start, stop) re-reads tokens[t - S - W : t + 1] densely, in batches."""
    context = spec.num_sinks + spec.window
    span = min(context + 1, tokens.shape[0])
    windows_per_pass = max(1, spec.chunk_size // span)  # about chunk_size tokens per forward pass
    positions = np.arange(start, stop)
    dtype = params_dtype(params)
    nll = []
    for batch_start in range(0, positions.shape[0], windows_per_pass):
        batch = positions[batch_start : batch_start + windows_per_pass]
        first = np.clip(batch - context, 0, tokens.shape[0] - span)
        windows = tokens[first[:, None] + np.arange(span)]
        targets = tokens[batch + 1]
        nll.append(_window_nll(params, windows, batch - first, targets, config, dtype))
    return np.asarray(jnp.concatenate(nll), np.float32)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _window_nll(params, windows, read_at, targets, config: ModelConfig, dtype):
    """NLL of `targets` [N] from logits at `read_at` [N] of a fresh dense pass over `windows` [N, span]."""
    cache = init_cache(config, windows.shape[0], 0, windows.shape[1], dtype)
    logits, _ = models.family(config).forward(params, cache, windows, config)
    picked = jnp.take_along_axis(logits, read_at[:, None, None], axis=1)[:, 0]
    return _token_nll(picked, targets)
