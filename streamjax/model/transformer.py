"""The model's one forward pass: `forward` (checked, jitted, the cache donated) and `apply` (the same
function unjitted, for the loops that are jitted themselves: the token route, generation, training).

Letters: B streams, T tokens, V vocab, D model dim, N query heads, S sinks, C cache slots.

A chunk of tokens [B, T] goes through four steps, here and nowhere else:
1. `cache.plan_layers`: positions, masks, RoPE tables and cache destinations, once per layer type (one
   plan for all layers of a model without layer types; the full and the sliding layers' of a hybrid one);
2. the embedding, then the family's `decoder_layer` for each layer, which reads its own cache entry
   and its layer type's plan and returns the chunk's keys and values (`attention.LayerOutputs`);
3. the family's `final_norm` and the head (the tied embedding or `lm_head`);
4. `cache.write_layers` writes every layer's new keys and values once all layers have read the cache.

What a caller wants besides the cache is chosen by arguments: logits of every position, of the last
valid one or none; per-token NLL of `targets` (logsumexp minus the target's logit, so no array of
log-probabilities is written); the attention weights of every layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from streamjax.model import families
from streamjax.model.attention import LayerCache
from streamjax.model.cache import SinkCache, layer_entries, plan_layers, write_layers
from streamjax.model.config import ModelConfig
from streamjax.model.jit import model_jit

LOGITS = ("all", "last", "none")


class ForwardOutput(NamedTuple):
    """What one forward pass returns (fields a caller did not ask for are None).

    logits: float32 [B, T, V] ("all") or [B, V] ("last": each stream's last valid token).
    cache: the cache after the chunk (None without a cache).
    nll: float32 NLL of `targets`, shaped like them; 0 at padding positions.
    weights: per layer [B, N, T, S + C + T] softmax weights over sinks, cache slots and the chunk.
    """

    logits: jax.Array | None
    cache: SinkCache | None
    nll: jax.Array | None
    weights: tuple[jax.Array, ...] | None


def apply(
    params: dict,
    cache: SinkCache | None,
    tokens: jax.Array,
    config: ModelConfig,
    *,
    num_valid: jax.Array | None = None,
    targets: jax.Array | None = None,
    logits: str = "all",
    return_weights: bool = False,
) -> ForwardOutput:
    """Feed tokens [B, T] through the model and the cache (see `forward` for the arguments).

    `cache=None` is a plain causal pass over the chunk from position 0, with no cache before or after.
    """
    family = families.get(config)
    batch, length = tokens.shape
    plans = plan_layers(cache, batch, length, config, num_valid)
    layer_caches = (
        [None] * config.num_layers if cache is None else [LayerCache(*e) for e in layer_entries(cache, config)]
    )
    x, outputs = _embed(params, tokens, config), []
    for p, layer_cache, kind in zip(params["layers"], layer_caches, config.layer_type_of, strict=True):
        x, layer_outputs = family.decoder_layer(p, x, layer_cache, plans[kind], config)
        outputs.append(layer_outputs)
    x = family.final_norm(params, x, config)
    num_valid = plans["full_attention"].num_valid
    if logits == "last":
        last = jnp.maximum(num_valid - 1, 0)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    scores = _head(params, x, config)
    nll = None if targets is None else _token_nll(scores, targets, num_valid if logits != "last" else None)
    new_cache = None
    if cache is not None:
        new_cache = write_layers(cache, plans, tokens, config, [o.keys for o in outputs], [o.values for o in outputs])
    weights = tuple(o.weights for o in outputs) if return_weights else None
    return ForwardOutput(None if logits == "none" else scores, new_cache, nll, weights)


def _embed(params: dict, tokens: jax.Array, config: ModelConfig) -> jax.Array:
    """The embedded tokens [B, T, D], times `config.embedding_multiplier` (in the params' dtype, as Gemma)."""
    x = params["embed"][tokens]
    if config.embedding_multiplier is None:
        return x
    return x * jnp.asarray(config.embedding_multiplier, x.dtype)


def _head(params: dict, x: jax.Array, config: ModelConfig) -> jax.Array:
    """Logits [..., V] in float32 of the final hidden states x [..., D], soft-capped if the config says so."""
    if config.tie_embeddings:
        logits = jnp.einsum("...d,vd->...v", x, params["embed"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...d,dv->...v", x, params["lm_head"], preferred_element_type=jnp.float32)
    if config.final_logit_softcap is None:
        return logits
    return config.final_logit_softcap * jnp.tanh(logits / config.final_logit_softcap)


def _token_nll(logits: jax.Array, targets: jax.Array, num_valid: jax.Array | None) -> jax.Array:
    """-log softmax(logits)[target] as logsumexp minus the target's logit; 0 past `num_valid` [B] if given."""
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
    if num_valid is None:
        return nll
    return jnp.where(jnp.arange(nll.shape[1]) < num_valid[:, None], nll, 0.0)


jitted_forward = model_jit(static_argnames=("config", "logits", "return_weights"), donate_argnames="cache")(apply)


def forward(
    params: dict,
    cache: SinkCache | None,
    tokens,
    config: ModelConfig,
    *,
    num_valid=None,
    targets=None,
    logits: str = "all",
    return_weights: bool = False,
) -> ForwardOutput:
    """Feed tokens [B, T] to every stream of `cache`: the model's one entry point (jitted, cache donated).

    params: the model's params (`streamjax.model.params`); cache: a `SinkCache` of B streams, or None for a
        plain causal pass from position 0 (no cache read or written).
    num_valid: [B] how many leading tokens each stream really feeds (default T); the rest is padding,
        never written to the cache nor attended, so chunks of any fill share one compiled program.
    targets: token ids to score, [B, T] (or [B] with `logits="last"`): the output's `nll`.
    logits: "all" [B, T, V], "last" [B, V] (each stream's last valid token), or "none".
    return_weights: also return every layer's attention weights.

    Inputs are checked on the host before anything compiles. The cache passed in must not be used
    again (it is donated); compiles once per (config, cache shape, T, arguments given).
    """
    check_forward_inputs(tokens, config, cache, num_valid, targets, logits)
    check_cache_dtype(params, cache)
    tokens = jnp.asarray(tokens, jnp.int32)
    num_valid = None if num_valid is None else jnp.asarray(num_valid, jnp.int32)
    targets = None if targets is None else jnp.asarray(targets, jnp.int32)
    return jitted_forward(
        params,
        cache,
        tokens,
        config,
        num_valid=num_valid,
        targets=targets,
        logits=logits,
        return_weights=return_weights,
    )


def check_tokens(tokens, config: ModelConfig, cache: SinkCache | None = None, name: str = "tokens") -> None:
    """Raise ValueError for tokens that are not a [B, T] batch of integer ids inside the vocabulary.

    Ids are range-checked only for host input (numpy arrays, lists: the user boundary). A `jax.Array`
    (or tracer) gets the shape, dtype and batch checks alone, from its metadata: reading its values would
    copy it to the host, so an on-device decode loop would wait on every token.
    """
    on_device = isinstance(tokens, jax.Array)
    array = tokens if on_device else np.asarray(tokens)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{name} must have shape [batch, length] with length >= 1, got {array.shape}")
    _check_ids(array, config, name, on_device)
    if cache is not None and array.shape[0] != cache.batch_size:
        raise ValueError(f"{name} have batch {array.shape[0]} but the cache holds {cache.batch_size} streams")


def check_cache_dtype(params: dict, cache: SinkCache | None) -> None:
    """Raise ValueError when the cache's keys and values are not in the params' dtype: a cache of another
    dtype would be a silent cast of every key and value written (bfloat16 params: a bfloat16 cache)."""
    if cache is None:
        return
    wanted, held = jnp.dtype(params["embed"].dtype), jnp.dtype(cache.dtype)
    if wanted != held:
        raise ValueError(
            f"the cache holds {held.name} keys and values but the params are {wanted.name}: create the cache "
            f"in the params' dtype, e.g. init_cache(config, batch_size, num_sinks, window, dtype=jnp.{wanted.name})"
        )


def _check_ids(array, config: ModelConfig, name: str, on_device: bool) -> None:
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integer ids, got dtype {array.dtype}")
    if on_device or array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {config.vocab_size})")


def check_forward_inputs(tokens, config: ModelConfig, cache, num_valid, targets, logits: str) -> None:
    """Raise ValueError for arguments of `forward` that do not fit together (see there)."""
    check_tokens(tokens, config, cache)
    batch, length = np.shape(tokens)
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    if num_valid is not None:
        if np.shape(num_valid) != (batch,):
            raise ValueError(f"num_valid must have shape [batch] = ({batch},), got {np.shape(num_valid)}")
        if not isinstance(num_valid, jax.Array) and not np.all((0 <= np.asarray(num_valid)) & (num_valid <= length)):
            raise ValueError(f"num_valid must lie in [0, {length}] (the chunk length), got {np.asarray(num_valid)}")
    if targets is not None:
        expected = (batch,) if logits == "last" else (batch, length)
        if np.shape(targets) != expected:
            raise ValueError(f"targets must have shape {expected} with logits={logits!r}, got {np.shape(targets)}")
        on_device = isinstance(targets, jax.Array)
        _check_ids(targets if on_device else np.asarray(targets), config, "targets", on_device)
