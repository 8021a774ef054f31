"""Pieces every model family shares: parameter specs, checkpoint name rules, norms, random init, and
the blocks of the LayerNorm decoders (MPT, GPT-NeoX, Falcon).

Letters: B streams, T new tokens, V vocab, D model dim, F MLP dim, L layers, N query heads,
K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from streamjax import cache as cache_lib
from streamjax.attention import plan_attention, sink_window_attention
from streamjax.config import ModelConfig

# Hugging Face activation names -> functions ("gelu" is the exact erf form, the others its tanh form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, logical axis names (for sharding rules) and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"  # "normal", "ones" or "zeros"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """The checkpoint tensor(s) named `source` (with `{i}` for the layer) become the param at `target`.

    `source` is one name, or a tuple of names whose tensors `transform` combines into one param
    (e.g. separate q, k and v into the fused `qkv`). Per-layer tensors (`{i}` in the names, target
    ("layers", name)) go to `params["layers"][i][name]`. `transform` takes the checkpoint array(s)
    and returns the param layout.
    """

    source: str | tuple[str, ...]
    target: tuple[str, ...]
    transform: Callable[..., np.ndarray] | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else self.source

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.sources[0]


def per_layer(layer_specs: dict, num_layers: int) -> list[dict]:
    """The specs of `num_layers` layers alike: params["layers"] is a list with one dict per layer.

    Each layer's weights are arrays of their own (not slices of arrays stacked over layers), so a
    matrix product reads them where they lie; slicing a stacked array inside a loop over layers makes
    XLA copy every weight first on CPU, which doubled the memory traffic of a decode step.
    """
    return [layer_specs] * num_layers


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


def add_bias(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    return x if bias is None else x + bias


def attention_specs(config: ModelConfig, bias: bool) -> dict:
    """Specs of one layer's fused qkv [D, K, G + 2, H] and output o [N, H, D] projections (and biases).

    qkv holds, per kv head, its G query heads, then its key and its value head (query head n is
    g of kv head n // G), so one matrix product projects all three and "kv_heads" shards them alike.
    """
    D, N, K, H = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    parts = N // K + 2
    specs = {
        "qkv": ParamSpec((D, K, parts, H), ("embed", "kv_heads", "parts", "head_dim")),
        "o": ParamSpec((N, H, D), ("heads", "head_dim", "embed")),
    }
    if bias:
        specs["qkv_bias"] = ParamSpec((K, parts, H), ("kv_heads", "parts", "head_dim"), init="zeros")
        specs["o_bias"] = ParamSpec((D,), ("embed",), init="zeros")
    return specs


def mlp_specs(config: ModelConfig, bias: bool) -> dict:
    """Specs of one layer's two-matrix MLP: up [D, F], down [F, D] (and their biases)."""
    D, F = config.hidden_size, config.intermediate_size
    specs = {
        "up": ParamSpec((D, F), ("embed", "mlp")),
        "down": ParamSpec((F, D), ("mlp", "embed")),
    }
    if bias:
        specs["up_bias"] = ParamSpec((F,), ("mlp",), init="zeros")
        specs["down_bias"] = ParamSpec((D,), ("embed",), init="zeros")
    return specs


def norm_specs(name: str, shape: tuple[int, ...], axes: tuple[str, ...], bias: bool) -> dict:
    """Specs of a LayerNorm called `name`: `name` (ones) and, with `bias`, `name_bias` (zeros)."""
    specs = {name: ParamSpec(shape, axes, init="ones")}
    if bias:
        specs[f"{name}_bias"] = ParamSpec(shape, axes, init="zeros")
    return specs


def norm(p: dict, name: str, x: jax.Array, config: ModelConfig) -> jax.Array:
    """The LayerNorm `name` of params `p` (with its bias if it has one) applied to x [..., D]."""
    return layer_norm(x, p[name], p.get(f"{name}_bias"), config.norm_eps)


def attention_block(p, h, cached_keys, cached_values, plan, config: ModelConfig, num_sinks: int):
    """Self-attention of the normed input h [B, T, D] through one layer's cache slots (keys [B, K, H, C],
    values [B, K, C, H]).

    Returns the output [B, T, D] and the chunk's keys (before RoPE) and values [B, K, T, H], which
    `run_decoder` writes into the cache once every layer has read it. q, k and v come from one matrix
    product on the fused weights as stored, the output from one on o ([N * H, D]), so none is copied.
    """
    batch, length, dim = h.shape
    qkv = add_bias(jnp.einsum("btd,dkph->btkph", h, p["qkv"]), p.get("qkv_bias"))  # [B, T, K, G + 2, H]
    if config.clip_qkv is not None:
        qkv = jnp.clip(qkv, -config.clip_qkv, config.clip_qkv)
    group = qkv.shape[3] - 2
    q = qkv[:, :, :, :group].reshape(batch, length, config.num_heads, config.head_dim)
    k, v = (qkv[:, :, :, part].transpose(0, 2, 1, 3) for part in (group, group + 1))  # heads first, as cached
    attended = sink_window_attention(q, k, v, cached_keys, cached_values, plan, config, num_sinks)
    return add_bias(attended.reshape(batch, length, -1) @ p["o"].reshape(-1, dim), p.get("o_bias")), k, v


def mlp_block(p: dict, h: jax.Array, config: ModelConfig) -> jax.Array:
    """down(act(up(h))) of h [B, T, D], with biases where the params have them."""
    up = add_bias(jnp.einsum("btd,df->btf", h, p["up"]), p.get("up_bias"))
    return add_bias(jnp.einsum("btf,fd->btd", ACTIVATIONS[config.hidden_act](up), p["down"]), p.get("down_bias"))


def layer_norm_decoder_layer(p, x, cached_keys, cached_values, plan, config: ModelConfig, num_sinks: int):
    """One pre-norm block in `config.residual_layout`; norms are `attn_norm` and (unless shared) `mlp_norm`.

    sequential: x + attn(attn_norm(x)), then + mlp(mlp_norm(.)); parallel: x + attn(attn_norm(x)) +
    mlp(mlp_norm(x)); parallel_shared_norm: x + attn(h) + mlp(h) with h = attn_norm(x).
    Returns x and the chunk's keys and values (see `attention_block`).
    """
    h = norm(p, "attn_norm", x, config)
    attended, keys, values = attention_block(p, h, cached_keys, cached_values, plan, config, num_sinks)
    if config.residual_layout == "sequential":
        x = x + attended
        return x + mlp_block(p, norm(p, "mlp_norm", x, config), config), keys, values
    if config.residual_layout == "parallel":
        h = norm(p, "mlp_norm", x, config)
    return x + attended + mlp_block(p, h, config), keys, values


def run_decoder(
    params: dict, cache: cache_lib.SinkCache, tokens: jax.Array, config: ModelConfig, decoder_layer, final_norm=None
):
    """Embed tokens [B, T], run `decoder_layer` through the layers in order, final norm and head.

    `decoder_layer(p, x, cached_keys, cached_values, plan, config, num_sinks) -> (x, keys, values)`
    reads one layer's cache slots (see `SinkCache`) and returns the chunk's keys and values [B, K, T, H].
    The layers are unrolled (a loop over per-layer arrays, see `per_layer`); every layer reads its
    cache and the chunk's entries are written after all of them, in place (see `streamjax.compile`).
    `final_norm(params, x)` defaults to the LayerNorm `final_norm` (+ `final_norm_bias`). Params hold
    `embed` [V, D], `layers` (a list of per-layer dicts) and, untied, `lm_head` [D, V].
    Returns logits [B, T, V] (float32) and the advanced cache.
    """
    plan = plan_attention(cache, tokens.shape[1], config)
    x, new_keys, new_values = params["embed"][tokens], [], []
    for p, cached_keys, cached_values in zip(params["layers"], cache.keys, cache.values, strict=True):
        x, keys, values = decoder_layer(p, x, cached_keys, cached_values, plan, config, cache.num_sinks)
        new_keys.append(keys)
        new_values.append(values)
    x = final_norm(params, x) if final_norm else norm(params, "final_norm", x, config)
    if config.tie_embeddings:
        logits = jnp.einsum("btd,vd->btv", x, params["embed"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", x, params["lm_head"], preferred_element_type=jnp.float32)
    return logits, cache_lib.advance(cache, plan.chunk, new_keys, new_values)


def qkv_rules(source: str, config: ModelConfig, bias: bool, parts_first: bool = False) -> list[TensorRule]:
    """Rules for a fused `source`.weight [rows, D] (and .bias [rows]) -> qkv [D, K, G + 2, H] (and qkv_bias).

    The rows are grouped per kv head as [K, G + 2, H] (its G queries, its key, its value: GPT-NeoX,
    Falcon), or with `parts_first` as [3, N, H] (all queries, then all keys, then all values: MPT,
    whose K = N).
    """
    K, H = config.num_kv_heads, config.head_dim
    layout = (3, K, H) if parts_first else (K, config.num_heads // K + 2, H)

    def grouped(array: np.ndarray) -> np.ndarray:  # [rows, ...] -> [K, G + 2, H, ...]
        array = array.reshape(*layout, *array.shape[1:])
        return np.moveaxis(array, 0, 1) if parts_first else array

    rules = [TensorRule(f"{source}.weight", ("layers", "qkv"), lambda w: np.moveaxis(grouped(w), 3, 0))]
    return rules + ([TensorRule(f"{source}.bias", ("layers", "qkv_bias"), grouped)] if bias else [])


def separate_qkv_rules(sources: tuple[str, str, str], config: ModelConfig, bias: bool) -> list[TensorRule]:
    """Rules fusing separate q [N * H, D], k and v [K * H, D] weights (`sources`.weight, and .bias) into qkv."""
    K, H = config.num_kv_heads, config.head_dim

    def grouped(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:  # -> [K, G + 2, H, ...]
        parts = [array.reshape(K, -1, H, *array.shape[1:]) for array in (q, k, v)]
        return np.concatenate(parts, axis=1)

    names = {kind: tuple(f"{source}.{kind}" for source in sources) for kind in ("weight", "bias")}
    rules = [TensorRule(names["weight"], ("layers", "qkv"), lambda *w: np.moveaxis(grouped(*w), 3, 0))]
    return rules + ([TensorRule(names["bias"], ("layers", "qkv_bias"), grouped)] if bias else [])


def output_rules(source: str, config: ModelConfig, bias: bool) -> list[TensorRule]:
    """Rules for the attention output projection `source`.weight [D, N * H] (and .bias [D])."""
    N, H, D = config.num_heads, config.head_dim, config.hidden_size
    rules = [TensorRule(f"{source}.weight", ("layers", "o"), lambda w: w.T.reshape(N, H, D))]
    return rules + ([TensorRule(f"{source}.bias", ("layers", "o_bias"))] if bias else [])


def linear_rules(source: str, target: str, bias: bool) -> list[TensorRule]:
    """Rules for a per-layer linear `source`.weight [out, in] -> `target` [in, out] (and .bias)."""
    rules = [TensorRule(f"{source}.weight", ("layers", target), np.transpose)]
    return rules + ([TensorRule(f"{source}.bias", ("layers", f"{target}_bias"))] if bias else [])


def norm_rules(source: str, target: tuple[str, ...], bias: bool) -> list[TensorRule]:
    """Rules for a LayerNorm `source`.weight (and .bias) -> `target` (and `target`_bias)."""
    rules = [TensorRule(f"{source}.weight", target)]
    return rules + ([TensorRule(f"{source}.bias", (*target[:-1], f"{target[-1]}_bias"))] if bias else [])
