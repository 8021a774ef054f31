"""Streaming perplexity: per-token negative log-likelihood of a long text under the paper's methods.

Methods (S sinks, W window, so every method sees at most S + W earlier tokens except `dense`):
    dense      no eviction: the cache holds the whole text.
    window     window attention: no sinks, the last S + W tokens (same cache size as streaming).
    streaming  StreamingLLM: the first S tokens and the last W tokens.
    recompute  sliding window with re-computation: each token's logits from a fresh forward pass
               over the previous S + W tokens.

Routes for the cached methods: `chunk` feeds `chunk_size` tokens per forward pass (exact, see
`streamjax.model.cache`), `token` feeds one token at a time in a `lax.scan` (the reference). Evaluation
advances in segments so a long run can report progress and be checkpointed between segments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from streamjax.model.cache import SinkCache, check_cache_shape, init_cache
from streamjax.model.config import ModelConfig
from streamjax.model.transformer import check_tokens, forward
from streamjax.stream.feed import pad_chunk, token_route

METHODS = ("dense", "window", "streaming", "recompute")
ROUTES = ("chunk", "token")


def parse_methods(method: str, allowed: tuple[str, ...] = METHODS) -> list[str]:
    """The methods of a comma-separated list such as "dense,window,streaming", each one of `allowed`
    and none twice; ValueError naming the problem otherwise."""
    methods = [name.strip() for name in str(method).split(",") if name.strip()]
    if not methods:
        raise ValueError(f"method {method!r} names no method; choose from {', '.join(allowed)}")
    unknown = [name for name in methods if name not in allowed]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(allowed)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"method {method!r} lists a method twice")
    return methods


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: a method, the cache budget S + W and how tokens are fed.

    S + W is the cache of the full-attention layers. The sliding layers of a hybrid model keep the
    model's own window (`cache.init_cache`) whatever the method, with `sliding_sinks` sinks besides.
    """

    method: str = "streaming"
    num_sinks: int = 4
    window: int = 1020
    route: str = "chunk"
    chunk_size: int = 512
    sliding_sinks: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.route not in ROUTES:
            raise ValueError(f"unknown route {self.route!r}; choose one of {', '.join(ROUTES)}")
        check_cache_shape(self.num_sinks, self.window)
        if isinstance(self.sliding_sinks, bool) or not isinstance(self.sliding_sinks, int) or self.sliding_sinks < 0:
            raise ValueError(f"sliding_sinks must be an int >= 0, got {self.sliding_sinks!r}")
        if self.sliding_sinks and self.method == "recompute":
            raise ValueError("recompute re-reads a plain window for every prediction: it keeps no sliding sinks")
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
    cache = init_cache(config, 1, num_sinks, window, dtype, sliding_sinks=spec.sliding_sinks)
    return EvalState(position=0, cache=cache)


def check_text_tokens(tokens: np.ndarray, config: ModelConfig) -> np.ndarray:
    """The text as int32 [T] after checking it has at least two tokens, all in the vocabulary."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.shape[0] < 2:
        raise ValueError(f"the text must have at least two tokens to predict one, got shape {tokens.shape}")
    check_tokens(tokens[None], config)
    return tokens.astype(np.int32)


def score_next(
    params: dict, config: ModelConfig, tokens: np.ndarray, spec: EvalSpec, state: EvalState, num_predictions: int
) -> tuple[EvalState, np.ndarray]:
    """Predict the next `num_predictions` tokens of `tokens` [T]: new state and float32 NLL per token.

    The token at `state.position` predicts `tokens[position + 1]`; a text of T tokens has T - 1
    predictions. The cache of `state` is donated.
    """
    stop = min(state.position + num_predictions, tokens.shape[0] - 1)
    inputs, targets = tokens[state.position : stop], tokens[state.position + 1 : stop + 1]
    if spec.method == "recompute":
        return EvalState(stop, None), _recompute_nll(params, config, tokens, spec, state.position, stop)
    if spec.route == "token":
        out = token_route(params, state.cache, inputs[None], config, targets=targets[None], logits="none")
        return EvalState(stop, out.cache), np.asarray(out.nll[0], np.float32)
    cache, pieces = state.cache, []
    for start in range(0, inputs.shape[0], spec.chunk_size):
        chunk_inputs, num_valid = pad_chunk(inputs[None, start : start + spec.chunk_size], spec.chunk_size)
        chunk_targets, _ = pad_chunk(targets[None, start : start + spec.chunk_size], spec.chunk_size)
        out = forward(params, cache, chunk_inputs, config, num_valid=num_valid, targets=chunk_targets, logits="none")
        cache = out.cache
        pieces.append(out.nll[0, : min(spec.chunk_size, inputs.shape[0] - start)])
    return EvalState(stop, cache), np.asarray(jnp.concatenate(pieces), np.float32)


def evaluate(params: dict, config: ModelConfig, tokens, spec: EvalSpec) -> np.ndarray:
    """Float32 NLL [T - 1] of every next-token prediction over `tokens` [T], in one go (the cache in
    the params' dtype)."""
    tokens = check_text_tokens(tokens, config)
    state = init_state(config, spec, tokens.shape[0], params_dtype(params))
    _, nll = score_next(params, config, tokens, spec, state, tokens.shape[0])
    return nll


def _recompute_nll(params, config: ModelConfig, tokens: np.ndarray, spec: EvalSpec, start: int, stop: int):
    """NLL of each prediction t in [start, stop) from a plain causal pass over tokens[t - S - W : t + 1]
    (the last S + W tokens and t itself), reading only the last position's logits.

    The windows are batched, about `chunk_size` tokens per pass, each row padded at its end, and the
    last batch padded with dummy rows, so every pass runs one compiled program.
    """
    span = min(spec.num_sinks + spec.window + 1, tokens.shape[0])
    rows = max(1, spec.chunk_size // span)
    nll = []
    for batch_start in range(start, stop, rows):
        positions = np.arange(batch_start, batch_start + rows)
        real = positions < stop
        first = np.maximum(positions - span + 1, 0)
        num_valid = np.where(real, positions + 1 - first, 1)
        index = np.minimum(first[:, None] + np.arange(span), np.where(real, positions, 0)[:, None])
        windows = np.where(np.arange(span) < num_valid[:, None], tokens[index], 0)
        targets = np.where(real, tokens[np.minimum(positions + 1, tokens.shape[0] - 1)], 0)
        out = forward(params, None, windows, config, num_valid=num_valid, targets=targets, logits="last")
        nll.append(np.asarray(out.nll)[real])
    return np.concatenate(nll).astype(np.float32)
