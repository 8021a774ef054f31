"""Hugging Face weights without torch: safetensors directories (GGUF files come through `streamjax.files.gguf`).

Tensors are converted by each family's table of `TensorRule`s, checked against the family's
`ParamSpec` shapes, and placed as JAX arrays in the requested dtype: on the default device, or,
given a mesh, each tensor straight onto its shards (so a model larger than one device loads).

Nothing here runs code from a checkpoint: pickled weights (`pytorch_model.bin`, `*.pt`, ...) are refused,
never unpickled, and so is a config whose `auto_map` asks for the checkpoint's own Python. Files are read
through the `safetensors` library, which checks each header's shapes and offsets against the file; a
bad file raises WeightsError naming it.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors reads BF16 by that name)
import numpy as np
import safetensors
from jax.sharding import Mesh

from streamjax.model import families, sharding
from streamjax.model.config import ModelConfig, UnsupportedConfigError
from streamjax.model.params import ParamSpec, TensorRule

# Buffers some checkpoints carry that are recomputed, not learned (GPT-NeoX's are `attention.bias`).
_IGNORED_TENSORS = re.compile(r".*(rotary_emb\.inv_freq|attn\.masked_bias|attn\.bias|\.attention\.(masked_)?bias)$")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Pickled weights (torch.save), never loaded: unpickling runs code.
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
# Model types whose checkpoints' own code (`auto_map`) streamjax reimplements, so the map is only metadata.
_REIMPLEMENTED_REMOTE_CODE = {"mpt"}


class WeightsError(ValueError):
    """Weights that cannot be the model they claim to be: an unreadable or inconsistent checkpoint file,
    or missing, extra or mis-shaped tensors."""


class RemoteCodeError(UnsupportedConfigError):
    """A checkpoint asks for its own Python code (`auto_map`), which streamjax never runs."""


class SafetensorsTensors(Mapping[str, np.ndarray]):
    """Tensors of `.safetensors` files by name, each read (copied out of its file) when looked up.

    The `safetensors` library checks a file's header when opening it: every dtype known, every shape
    matching its byte range, and the ranges tiling the data exactly to the end of the file.
    """

    def __init__(self, sources: dict[str, tuple[pathlib.Path, Any]]):
        self._sources = sources  # tensor name -> (file, open `safe_open` handle)

    def __getitem__(self, name: str) -> np.ndarray:
        path, handle = self._sources[name]
        try:
            return handle.get_tensor(name)
        except (safetensors.SafetensorError, AttributeError, TypeError, ValueError) as error:
            raise WeightsError(f"cannot read tensor {name!r} of {path} as a numpy array: {error}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def read_safetensors(path: str | pathlib.Path) -> SafetensorsTensors:
    """The tensors of one `.safetensors` file by name, each read when looked up; WeightsError naming the
    file if its header does not describe its bytes (a lying shape or offset, a truncated file)."""
    path = pathlib.Path(path)
    handle = _open_safetensors(path)
    return SafetensorsTensors({name: (path, handle) for name in handle.keys()})


def _open_safetensors(path: pathlib.Path) -> Any:
    try:
        return safetensors.safe_open(path, framework="numpy")
    except safetensors.SafetensorError as error:  # a header that lies about dtypes, shapes or offsets
        raise WeightsError(f"{path} is not a valid safetensors file ({error}); re-save or re-download it") from None


def read_hf_directory(directory: str | pathlib.Path) -> tuple[dict[str, Any], SafetensorsTensors]:
    """The config dict and all tensors of a Hugging Face checkpoint directory (single or sharded).

    A sharded checkpoint is read through its `model.safetensors.index.json`, so a stray extra file is
    not merged in. Refuses a config that asks for the checkpoint's own code (RemoteCodeError) and
    never reads pickled weights.
    """
    directory = pathlib.Path(directory)
    config = read_hf_config(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return config, _read_indexed(index)
    sources: dict[str, tuple[pathlib.Path, Any]] = {}
    for file in safetensors_files(directory):
        handle = _open_safetensors(file)
        for name in handle.keys():
            if name in sources:
                raise WeightsError(
                    f"tensor {name!r} is in both {sources[name][0]} and {file}; remove the stray file or add "
                    f"a {SAFETENSORS_INDEX} that says which files make the checkpoint"
                )
            sources[name] = (file, handle)
    return config, SafetensorsTensors(sources)


def read_hf_config(directory: pathlib.Path) -> dict[str, Any]:
    """The `config.json` dict of a checkpoint directory; refuses one that asks for remote code."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint: it has no config.json")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path} is not a JSON object")
    check_no_remote_code(config_path, config, allowed=config.get("model_type") in _REIMPLEMENTED_REMOTE_CODE)
    return config


def read_json(path: pathlib.Path) -> Any:
    """The JSON value of a checkpoint's text file; WeightsError naming the file if it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{path} is not valid UTF-8 JSON: {error}") from None


def check_no_remote_code(path: pathlib.Path, config: Any, allowed: bool = False) -> None:
    """Raise RemoteCodeError if a config or tokenizer config asks for the checkpoint's own Python code.

    `allowed`: the model type is one whose exported code streamjax reimplements, so `auto_map` is
    metadata there (MPT checkpoints from llm-foundry carry one).
    """
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map or allowed:
        return
    modules = sorted({str(ref).split("--")[-1].split(".")[0] for ref in _auto_map_refs(auto_map)})
    present = [f"{module}.py" for module in modules if (path.parent / f"{module}.py").is_file()]
    raise RemoteCodeError(
        f"{path} asks for the checkpoint's own Python code (auto_map: {json.dumps(auto_map)}"
        f"{'; files ' + ', '.join(present) if present else ''}); streamjax never runs code from a checkpoint. "
        "Use a checkpoint of a model type streamjax implements (if its model_type's built-in code is the "
        "model, delete auto_map and the .py files)"
    )


def _auto_map_refs(auto_map: Any) -> list[str]:
    """The "module.Class" strings of an `auto_map` (values are strings or [slow, fast] pairs)."""
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    return [ref for value in values for ref in (value if isinstance(value, list) else [value]) if ref]


def safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The `.safetensors` files a checkpoint directory is made of: those its index names, else all of them.

    Raises WeightsError if an indexed file is missing, and if the directory has only pickled weights
    (never loaded: unpickling runs code); FileNotFoundError if it has no weights at all.
    """
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return sorted(set(_index_map(index).values()))
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(path.name for path in directory.iterdir() if path.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise WeightsError(
            f"{directory} has only pickled weights ({', '.join(pickled[:5])}), which streamjax never loads "
            "(unpickling can run code). Convert them once, where you trust the file: load the model with "
            "transformers and save_pretrained(dir) (safetensors; transformers 4 needs safe_serialization=True)"
        )
    raise FileNotFoundError(
        f"{directory} has no *.safetensors files; save the model with transformers' save_pretrained(dir) "
        "(transformers 4: save_pretrained(dir, safe_serialization=True))"
    )


def _index_map(index: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> file, from a `model.safetensors.index.json`; every file must be next to the index."""
    contents = read_json(index)
    weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index} has no weight_map (tensor name -> file name)")
    files = {}
    for name, file_name in weight_map.items():
        file = index.parent / str(file_name)
        if file.parent != index.parent or not file.is_file():
            raise WeightsError(f"{index} puts tensor {name!r} in {file_name!r}, which is not a file next to it")
        files[name] = file
    return files


def _read_indexed(index: pathlib.Path) -> SafetensorsTensors:
    """Exactly the tensors an index lists, each from the file it names; WeightsError if a file disagrees."""
    placement = _index_map(index)
    sources = {}
    for file in sorted(set(placement.values())):
        handle = _open_safetensors(file)
        listed = {name for name, where in placement.items() if where == file}
        held = set(handle.keys())
        if held != listed:
            missing, unlisted = sorted(listed - held), sorted(held - listed)
            raise WeightsError(
                f"{file} does not hold what {index} says: missing {missing[:5]}, not in the index {unlisted[:5]}"
            )
        sources.update({name: (file, handle) for name in sorted(held)})
    return SafetensorsTensors(sources)


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

    With a `mesh`, each param goes straight onto its shards (`streamjax.model.sharding`); else onto the default device.
    """
    hf_config, tensors = read_hf_directory(directory)
    config = families.config_from_hf(hf_config)
    try:
        return config, convert_tensors(tensors, config, dtype, place=mesh_placer(config, mesh))
    except WeightsError as error:
        raise WeightsError(f"{directory}: {error}") from None
