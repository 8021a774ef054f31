"""Pieces every model family shares: parameter specs, checkpoint name rules, norms, random init."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, logical axis names (for sharding rules) and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"  # "normal", "ones" or "zeros"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """A checkpoint tensor named `source` (with `{i}` for the layer) becomes the param at `target`.

    Per-layer tensors (`{i}` in the name, target under "layers") are stacked on a leading L axis.
    `transform` turns the checkpoint array into the param layout.
    """

    source: str
    target: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.source


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 and cast back."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32 and cast back."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    if weight is not None:
        normed = normed * weight
    return normed if bias is None else normed + bias


def init_params(specs: dict, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random params for `specs` (a pytree of ParamSpec): normal(0, scale), ones or zeros."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda leaf: isinstance(leaf, ParamSpec))
    keys = jax.random.split(key, len(leaves))
    fill = {"ones": jnp.ones, "zeros": jnp.zeros}
    params = [
        scale * jax.random.normal(k, spec.shape, dtype) if spec.init == "normal" else fill[spec.init](spec.shape, dtype)
        for k, spec in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, params)
