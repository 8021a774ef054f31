"""Hugging Face weights without torch: safetensors directories (GGUF files come through `streamjax.gguf`).

Tensors are converted by each family's table of `TensorRule`s, checked against the family's
`ParamSpec` shapes, and placed as JAX arrays in the requested dtype: on the default device, or,
given a mesh, each tensor straight onto its shards (so a model larger than one device loads).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from streamjax import families, sharding
from streamjax.config import ModelConfig
from streamjax.params import ParamSpec, TensorRule

# Buffers some checkpoints carry that are recomputed, not learned (GPT-NeoX's are `attention.bias`).
_IGNORED_TENSORS = re.compile(r".*(rotary_emb\.inv_freq|attn\.masked_bias|attn\.bias|\.attention\.(masked_)?bias)$")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


class WeightsError(ValueError):
    """Weights do not match the model it claims to be (missing, extra or mis-shaped tensors)."""


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of a `.safetensors` file, by tensor name (no copy until used)."""
    path = pathlib.Path(path)
    with path.open("rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    tensors = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        tensors[name] = data[start:end].view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors


def read_hf_directory(directory: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config dict and all tensors of a Hugging Face checkpoint directory (single or sharded)."""
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint: it has no config.json")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{directory} has no *.safetensors files; save the model with save_pretrained(safe_serialization=True)"
        )
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return json.loads(config_path.read_text()), tensors


def convert_tensors(
    tensors: Mapping[str, np.ndarray],
    config: ModelConfig,
    dtype: jnp.dtype = jnp.float32,
    place: Callable[[np.ndarray, tuple[str, ...]], jax.Array] | None = None,
) -> dict:
    """Params pytree from checkpoint tensors named as in Hugging Face, by the family's rules.

    `place(array, path)` puts each finished param on its devices (default: `jnp.asarray`).
    Raises WeightsError naming every missing, unexpected or mis-shaped tensor.
    """
    family = families.get(config)
    specs, rules = family.param_specs(config), family.hf_tensor_rules(config)
    used: set[str] = set()
    missing = [name for rule in rules for names in _source_names(rule, config) for name in names if name not in tensors]
    if missing:
        raise WeightsError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:10])}")
    params: dict = {"layers": [{} for _ in range(config.num_layers)]}
    for rule in rules:
        instances = _source_names(rule, config)
        paths = [_layer_path(rule.target, i) for i in range(len(instances))] if rule.per_layer else [rule.target]
        for names, path in zip(instances, paths):
            used.update(names)
            arrays = [tensors[name] for name in names]
            array = _convert_tensor(rule, names, arrays, _spec_at(specs, path)).astype(jnp.dtype(dtype))
            _set_at(params, path, place(array, path) if place else jnp.asarray(array))
    used.update(_tied_copies(tensors, config, family))
    unexpected = sorted(name for name in tensors if name not in used and not _IGNORED_TENSORS.match(name))
    if unexpected:
        raise WeightsError(
            f"checkpoint has {len(unexpected)} tensor(s) the {config.family} model does not use: "
            f"{', '.join(unexpected[:10])}"
        )
    return params


def _tied_copies(tensors: Mapping[str, np.ndarray], config: ModelConfig, family) -> list[str]:
    """Output-head tensors that merely repeat the tied input embedding (torch state dicts carry them)."""
    head, embed = family.tied_head
    if not config.tie_embeddings or head not in tensors:
        return []
    if not np.array_equal(np.asarray(tensors[head]), np.asarray(tensors[embed])):
        raise WeightsError(f"config ties embeddings but {head} differs from {embed}")
    return [head]


def _source_names(rule: TensorRule, config: ModelConfig) -> list[tuple[str, ...]]:
    """The names of the tensors each param of `rule` is made from: one tuple per layer, or one."""
    if rule.per_layer:
        return [tuple(source.format(i=i) for source in rule.sources) for i in range(config.num_layers)]
    return [rule.sources]


def _layer_path(target: tuple[str, ...], layer: int) -> tuple:
    """("layers", name) of a per-layer rule -> ("layers", layer, name), its place in the params."""
    return (target[0], layer, *target[1:])


def _convert_tensor(rule: TensorRule, names: tuple[str, ...], arrays: list, spec: ParamSpec) -> np.ndarray:
    transform = rule.transform or (lambda array: array)
    try:
        result = np.asarray(transform(*(np.asarray(array, np.float32) for array in arrays)))
    except ValueError:  # a reshape that cannot work: a tensor has the wrong size
        result = None
    if result is None or result.shape != tuple(spec.shape):
        shapes = ", ".join(f"{name} {tuple(array.shape)}" for name, array in zip(names, arrays))
        raise WeightsError(
            f"tensor shapes ({shapes}) do not give the expected {tuple(spec.shape)} for "
            f"{'/'.join(rule.target)}; check that the config matches the weights"
        )
    return result


def _spec_at(specs: dict, path: tuple) -> ParamSpec:
    for key in path:
        specs = specs[key]
    return specs


def _set_at(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key] if isinstance(tree, list) else tree.setdefault(key, {})
    tree[path[-1]] = value


def mesh_placer(config: ModelConfig, mesh: Mesh | None) -> Callable[[np.ndarray, tuple[str, ...]], jax.Array] | None:
    """The `place` of `convert_tensors` that loads onto the shards of `mesh`; None (one device) without a mesh."""
    return None if mesh is None else sharding.placer(families.param_specs(config), mesh)


def load_hf_directory(
    directory: str | pathlib.Path, dtype: jnp.dtype = jnp.float32, mesh: Mesh | None = None
) -> tuple[ModelConfig, dict]:
    """(config, params) from a Hugging Face checkpoint directory; refuses unsupported configs first.

    With a `mesh`, each param goes straight onto its shards (`streamjax.sharding`); else onto the default device.
    """
    hf_config, tensors = read_hf_directory(directory)
    config = families.config_from_hf(hf_config)
    return config, convert_tensors(tensors, config, dtype, place=mesh_placer(config, mesh))
