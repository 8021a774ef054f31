"""Position encodings: RoPE rotations and ALiBi slopes, both fed cache-relative positions.

Letters: B streams, P positions, R rotary dims (R / 2 frequencies), N heads.

Positions reaching attention are small integers (indices within the cache, or offsets from a chunk's
start; see `streamjax.model.cache`), so RoPE angles are read from host tables computed in float64 over the
range a chunk can use, exact to float32 however long the stream has run.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from streamjax.model.config import ModelConfig


def rope_frequencies(config: ModelConfig, layer_type: str = "full_attention") -> np.ndarray:
    """Inverse frequencies [R / 2] of the rotary embedding of a `layer_type` layer (sliding layers use
    `sliding_rope_theta` / `sliding_rope_scaling` where the config sets them), with `linear` or `llama3`
    scaling."""
    theta, scaling = config.rope_theta, config.rope_scaling_dict
    if layer_type == "sliding_attention" and config.sliding_rope_theta is not None:
        theta, scaling = config.sliding_rope_theta, dict(config.sliding_rope_scaling or ())
    rotary_dim = config.rotary_dim or config.head_dim
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    inv_freq = (1.0 / (theta**exponents)).astype(np.float32)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / np.float32(scaling["factor"])
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    return inv_freq


def _llama3_frequencies(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_rotation(
    positions: jax.Array, first: int, last: int, inv_freq: np.ndarray, dims_last: bool = True
) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, P, R/2] (`dims_last=False`: [B, R/2, P]) of the rotary angles at integer
    `positions` [B, P] in [first, last].

    The angles of every position in the range are computed on the host in float64 and rounded once;
    a float32 product `position * inv_freq` would be off by up to |angle| * 2^-24 radians. Positions
    outside the range (only those of masked slots) are clipped into it.
    """
    angles = np.arange(first, last + 1, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)
    index = jnp.clip(positions - first, 0, last - first)
    if dims_last:
        return tuple(jnp.asarray(table.astype(np.float32))[index] for table in (np.cos(angles), np.sin(angles)))
    # Gathered along the tables' last axis straight into [B, R/2, P]: a gather of rows then a transpose
    # had XLA transpose the table again inside every layer's rotation (4x slower on CPU).
    index = jnp.broadcast_to(index[:, None, :], (index.shape[0], angles.shape[1], index.shape[1]))
    tables = (np.cos(angles).T[None], np.sin(angles).T[None])  # [1, R/2, positions]
    return tuple(jnp.take_along_axis(jnp.asarray(table.astype(np.float32)), index, axis=2) for table in tables)


def apply_rope(x: jax.Array, rotation: tuple[jax.Array, jax.Array], dims_last: bool = True) -> jax.Array:
    """Rotate the first R head dims of `x` (half-split layout) by `rope_rotation` output.

    x: [B, ..., P, H] and rotation [B, P, R/2], or with `dims_last=False` x [B, ..., H, P] (the
    cache's keys) and rotation [B, R/2, P].
    """
    cos, sin = (t.reshape(t.shape[0], *(1,) * (x.ndim - 3), *t.shape[1:]) for t in rotation)
    axis = -1 if dims_last else -2
    rotary, passthrough = jnp.split(x, [2 * cos.shape[axis]], axis=axis)
    first, second = jnp.split(rotary.astype(jnp.float32), 2, axis=axis)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=axis)
    return jnp.concatenate([rotated.astype(x.dtype), passthrough], axis=axis)


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> np.ndarray:
    """Per-head ALiBi slopes [N] (Press et al.), for head counts that are not powers of two too."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-max_bias / closest)
    slopes = base ** np.arange(1, closest + 1)
    if closest < num_heads:
        extra_base = 2.0 ** (-max_bias / (2 * closest))
        slopes = np.concatenate([slopes, extra_base ** np.arange(1, 2 * (num_heads - closest) + 1, 2)])
    return slopes.astype(np.float32)


def config_alibi_slopes(config: ModelConfig) -> np.ndarray:
    """The slopes [N] a config asks for: its own `alibi_slopes`, else the standard ones."""
    if config.alibi_slopes is None:
        return alibi_slopes(config.num_heads)
    return np.asarray(config.alibi_slopes, np.float32)
