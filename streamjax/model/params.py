"""Parameters: what each one is (`ParamSpec`: shape, logical axes, init) and how checkpoint tensors
become them (`TensorRule`). Loading, sharding and random init read these; the model never does.

Letters: D model dim, F MLP dim, V vocab, N query heads, K kv heads, G = N // K, H head dim.

Params are a nested dict: `embed` [V, D], `layers` (a list with one dict of arrays per layer), the
final norm, and `lm_head` [D, V] when the head is not tied to the embedding.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from streamjax.model.config import ModelConfig


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


def is_spec(leaf) -> bool:
    return isinstance(leaf, ParamSpec)


def model_specs(config: ModelConfig, layer: dict, final_norm: dict) -> dict:
    """Specs of a whole model: the embedding, `num_layers` layers alike, the final norm and, untied, the head.

    Each layer's weights are arrays of their own (not slices of arrays stacked over layers), so a
    matrix product reads them where they lie; slicing a stacked array inside a loop over layers makes
    XLA copy every weight first on CPU, which doubled the memory traffic of a decode step.
    """
    D, V = config.hidden_size, config.vocab_size
    specs = {"embed": ParamSpec((V, D), ("vocab", "embed")), "layers": [layer] * config.num_layers, **final_norm}
    if not config.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def init_params(specs: dict, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random params for `specs` (a pytree of ParamSpec): normal(0, scale), ones or zeros.

    Each normal param draws from `key` folded with a stable hash of its own path ("layers/3/qkv",
    `param_path_key`), so adding or removing a param (e.g. `sink_logit`) changes no other param's value.
    """
    fill = {"ones": jnp.ones, "zeros": jnp.zeros}

    def make(path, spec: ParamSpec) -> jax.Array:
        if spec.init != "normal":
            return fill[spec.init](spec.shape, dtype)
        return scale * jax.random.normal(jax.random.fold_in(key, param_path_key(path)), spec.shape, dtype)

    return jax.tree_util.tree_map_with_path(make, specs, is_leaf=is_spec)


def param_path_key(path: tuple) -> int:
    """A stable 31-bit integer of a pytree path (the first 4 bytes of the SHA-256 of "layers/3/qkv")."""
    name = "/".join(str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path)
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") >> 1


def attention_specs(config: ModelConfig, bias: bool, output_bias: bool | None = None) -> dict:
    """Specs of one layer's fused qkv [D, K, G + 2, H] and output o [N, H, D] projections, with `bias`
    the qkv biases and with `output_bias` (default: `bias`) o's.

    qkv holds, per kv head, its G query heads, then its key and its value head (query head n is
    g of kv head n // G), so one matrix product projects all three and "kv_heads" shards them alike.
    A model with `config.softmax == "sink_logit"` adds the learned sink logits `sink_logit` [N] (zeros),
    one with `config.qk_norm` the query and key norms `q_norm` and `k_norm` [H] (ones).
    """
    D, N, K, H = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    parts = N // K + 2
    specs = {
        "qkv": ParamSpec((D, K, parts, H), ("embed", "kv_heads", "parts", "head_dim")),
        "o": ParamSpec((N, H, D), ("heads", "head_dim", "embed")),
    }
    if bias:
        specs["qkv_bias"] = ParamSpec((K, parts, H), ("kv_heads", "parts", "head_dim"), init="zeros")
    if bias if output_bias is None else output_bias:
        specs["o_bias"] = ParamSpec((D,), ("embed",), init="zeros")
    if config.softmax == "sink_logit":
        specs["sink_logit"] = ParamSpec((N,), ("heads",), init="zeros")
    if config.qk_norm:
        specs.update({name: ParamSpec((H,), ("head_dim",), init="ones") for name in ("q_norm", "k_norm")})
    return specs


def mlp_specs(config: ModelConfig, bias: bool) -> dict:
    """Specs of one layer's two-matrix MLP: up [D, F], down [F, D] (and their biases)."""
    D, F = config.hidden_size, config.intermediate_size
    specs = {"up": ParamSpec((D, F), ("embed", "mlp")), "down": ParamSpec((F, D), ("mlp", "embed"))}
    if bias:
        specs["up_bias"] = ParamSpec((F,), ("mlp",), init="zeros")
        specs["down_bias"] = ParamSpec((D,), ("embed",), init="zeros")
    return specs


def gated_mlp_specs(config: ModelConfig, bias: bool) -> dict:
    """Specs of one layer's gated MLP: gate_up [D, 2, F] (gate and up stacked), down [F, D] (and their biases)."""
    D, F = config.hidden_size, config.intermediate_size
    specs = {"gate_up": ParamSpec((D, 2, F), ("embed", "parts", "mlp")), "down": ParamSpec((F, D), ("mlp", "embed"))}
    if bias:
        specs["gate_up_bias"] = ParamSpec((2, F), ("parts", "mlp"), init="zeros")
        specs["down_bias"] = ParamSpec((D,), ("embed",), init="zeros")
    return specs


def norm_specs(name: str, config: ModelConfig, bias: bool) -> dict:
    """Specs of a norm over D called `name`: `name` (ones) and, with `bias`, `name_bias` (zeros)."""
    specs = {name: ParamSpec((config.hidden_size,), ("embed",), init="ones")}
    if bias:
        specs[f"{name}_bias"] = ParamSpec((config.hidden_size,), ("embed",), init="zeros")
    return specs


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


def gated_mlp_rules(source: str, bias: bool) -> list[TensorRule]:
    """Rules for a gated MLP's `source`.gate_proj and .up_proj weights [F, D] -> gate_up [D, 2, F] and its
    .down_proj [D, F] -> down [F, D], with `bias` their biases -> gate_up_bias [2, F] and down_bias [D]."""
    gate_up = tuple(f"{source}.{name}_proj" for name in ("gate", "up"))
    rules = [
        TensorRule(tuple(f"{s}.weight" for s in gate_up), ("layers", "gate_up"), lambda g, u: np.stack([g.T, u.T], 1)),
        TensorRule(f"{source}.down_proj.weight", ("layers", "down"), np.transpose),
    ]
    if bias:
        rules += [
            TensorRule(tuple(f"{s}.bias" for s in gate_up), ("layers", "gate_up_bias"), lambda g, u: np.stack([g, u])),
            TensorRule(f"{source}.down_proj.bias", ("layers", "down_bias")),
        ]
    return rules


def linear_rules(source: str, target: str, bias: bool) -> list[TensorRule]:
    """Rules for a per-layer linear `source`.weight [out, in] -> `target` [in, out] (and .bias)."""
    rules = [TensorRule(f"{source}.weight", ("layers", target), np.transpose)]
    return rules + ([TensorRule(f"{source}.bias", ("layers", f"{target}_bias"))] if bias else [])


def norm_rules(source: str, target: tuple[str, ...], bias: bool) -> list[TensorRule]:
    """Rules for a norm `source`.weight (and .bias) -> `target` (and `target`_bias)."""
    rules = [TensorRule(f"{source}.weight", target)]
    return rules + ([TensorRule(f"{source}.bias", (*target[:-1], f"{target[-1]}_bias"))] if bias else [])


def head_rules(embedding: str, head: str, config: ModelConfig) -> list[TensorRule]:
    """Rules for the input embedding [V, D] and, untied, the output head `head` [V, D] -> lm_head [D, V]."""
    rules = [TensorRule(embedding, ("embed",))]
    return rules + ([] if config.tie_embeddings else [TensorRule(head, ("lm_head",), np.transpose)])
