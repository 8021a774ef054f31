"""Device meshes and sharding: params, cache and batches laid over a ("data", "model") mesh.

"data" splits independent streams (the batch B), "model" splits heads, MLP and vocabulary (tensor
parallelism). Every array dimension has a logical axis name (`ParamSpec.axes` for params,
`SinkCache.logical_axes()` for the cache) and `LOGICAL_RULES` maps each logical axis to a mesh axis or to None
(replicated). The jitted functions of `streamjax.stream.feed` and `streamjax.stream.perplexity` need no
change: given sharded params and cache, XLA's GSPMD partitions the computation and keeps the
cache on its shards from step to step, with no host round trip.

Divisibility rule: a dimension is split over its mesh axis only when its size is a multiple of
that axis's size; otherwise that one dimension is replicated, and the others keep their split.
E.g. SmolLM2-135M (9 heads, 3 kv heads, MLP 1536, vocab 49152) on `model=8` replicates the
attention weights and kv heads of the cache but splits its MLP and vocabulary 8 ways, and one
stream (batch 1) on `data=2` is replicated over "data". Results do not depend on the layout beyond
float rounding: sharding changes where numbers live and the order of some sums, not what is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from streamjax.model.cache import SinkCache
from streamjax.model.params import ParamSpec

MESH_AXES = ("data", "model")

# The one table from logical axes (of params and cache) to mesh axes; None replicates.
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "embed": None,
    "head_dim": None,
    "parts": None,  # which part of a fused projection (q/k/v of a kv head, gate/up)
    "slots": None,
}


def parse_mesh(spec: str) -> dict[str, int]:
    """Axis sizes from a string like "data=2,model=4"; an axis left out has size 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = (piece.strip() for piece in item.partition("="))
        if name not in MESH_AXES:
            raise ValueError(
                f"unknown mesh axis {name!r} in {spec!r}: use {' and '.join(MESH_AXES)}, e.g. 'data=2,model=4'"
            )
        if name in seen:
            raise ValueError(f"mesh axis {name!r} is given twice in {spec!r}")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh axis {name!r} needs a positive integer size, got {value!r} in {spec!r}")
        seen.add(name)
        sizes[name] = int(value)
    if not seen:
        raise ValueError(f"mesh spec {spec!r} names no axis: write e.g. 'data=1,model=8'")
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: list | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all) from "data=2,model=4" or {"data": 2, ...}.

    The axis sizes must multiply to the number of devices. Axes are `Auto`, so that GSPMD propagates
    shardings through the unannotated model code.
    """
    sizes = parse_mesh(spec) if isinstance(spec, str) else {**dict.fromkeys(MESH_AXES, 1), **spec}
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}: use {' and '.join(MESH_AXES)}")
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(sizes[name] for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but there are {len(devices)}: "
            f"make data * model = {len(devices)}"
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def config_mesh(spec: str) -> Mesh | None:
    """The mesh of a config's `mesh` field over all devices (every process's, in a distributed run), or None
    for "" (the default device); a ValueError names the field when the mesh does not fit the devices, or
    when a distributed run has no mesh."""
    processes = jax.process_count()
    if not spec:
        if processes > 1:
            raise ValueError(
                f"a distributed run of {processes} processes needs config.mesh over their {jax.device_count()} "
                f"devices, e.g. 'data={processes},model={jax.device_count() // processes}'"
            )
        return None
    try:
        return make_mesh(spec)
    except ValueError as error:
        where = (
            "this machine"
            if processes == 1
            else f"the {processes} processes' devices ({jax.local_device_count()} each)"
        )
        raise ValueError(f"config.mesh={spec!r} does not fit {where}: {error}") from None


def logical_partition(axes: tuple[str, ...], shape: tuple[int, ...], axis_sizes: Mapping[str, int]) -> PartitionSpec:
    """PartitionSpec of an array of `shape` with logical `axes`, by `LOGICAL_RULES` and the divisibility rule."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    spec, used = [], set()
    for axis, size in zip(axes, shape):
        if axis not in LOGICAL_RULES:
            raise ValueError(f"logical axis {axis!r} has no sharding rule; add it to LOGICAL_RULES")
        mesh_axis = LOGICAL_RULES[axis]
        if mesh_axis is not None and mesh_axis in used:
            raise ValueError(f"logical axes {axes} map two dimensions onto mesh axis {mesh_axis!r}")
        mesh_size = axis_sizes.get(mesh_axis, 1)
        spec.append(mesh_axis if mesh_size > 1 and size % mesh_size == 0 else None)
        used.add(mesh_axis)
    while spec and spec[-1] is None:  # the canonical form, as jit returns it, so that outputs match inputs
        spec.pop()
    return PartitionSpec(*spec)


def logical_sharding(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """NamedSharding on `mesh` of an array of `shape` with logical `axes`."""
    return NamedSharding(mesh, logical_partition(axes, shape, mesh.shape))


def param_shardings(specs: dict, mesh: Mesh) -> dict:
    """A NamedSharding for every param, from a pytree of ParamSpec (a family's `param_specs(config)`)."""
    return jax.tree.map(
        lambda spec: logical_sharding(spec.axes, spec.shape, mesh), specs, is_leaf=lambda x: isinstance(x, ParamSpec)
    )


def cache_shardings(cache: SinkCache, mesh: Mesh) -> SinkCache:
    """A SinkCache of NamedShardings: keys/values on batch -> data and kv heads -> model, counters on data.

    `cache` may be a real cache or its `jax.eval_shape`; the result serves `jax.device_put` and `out_shardings`.
    """
    fields = {
        name: jax.tree.map(lambda array, axes=axes: logical_sharding(axes, array.shape, mesh), getattr(cache, name))
        for name, axes in SinkCache.logical_axes().items()
    }
    sliding = None if cache.sliding is None else cache_shardings(cache.sliding, mesh)  # a hybrid model's
    return cache.replace(**fields, sliding=sliding)


def batch_sharding(mesh: Mesh, batch_size: int | None = None) -> NamedSharding:
    """Sharding of a batch [B, ...] (tokens, targets): B over "data", replicated if `batch_size` does not divide."""
    if batch_size is None:
        return NamedSharding(mesh, PartitionSpec("data"))
    return logical_sharding(("batch",), (batch_size,), mesh)


def shard_params(params: dict, specs: dict, mesh: Mesh) -> dict:
    """`params` moved onto their shards of `mesh` (see `param_shardings`)."""
    return jax.device_put(params, param_shardings(specs, mesh))


def shard_cache(cache: SinkCache, mesh: Mesh) -> SinkCache:
    """`cache` moved onto its shards of `mesh` (see `cache_shardings`)."""
    return jax.device_put(cache, cache_shardings(cache, mesh))


def to_host(array) -> np.ndarray:
    """The whole of `array` as a NumPy array on this host, also when it spans the devices of several processes
    (a mesh of a `jax.distributed` run): then gathered from every process, which must all call this together."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def placer(specs: dict, mesh: Mesh) -> Callable[[np.ndarray, tuple[str, ...]], jax.Array]:
    """The `place(array, path)` of `checkpoint.convert_tensors` that loads each param straight onto its shards.

    Each device receives only its slice of the host array, so a model never sits whole on one device. On a
    mesh over several processes each process places its own devices' slices of its own copy (`jax.device_put`
    of a host array would first gather every process's copy, to check that they are equal).
    """

    def place(array: np.ndarray, path: tuple[str, ...]) -> jax.Array:
        spec = specs
        for key in path:
            spec = spec[key]
        layout = logical_sharding(spec.axes, spec.shape, mesh)
        return jax.make_array_from_callback(array.shape, layout, lambda index: array[index])

    return place
