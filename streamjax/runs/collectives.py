"""The collectives of a compiled program: what XLA moves between devices, between which, and for how long.

A program jitted over a mesh is partitioned by XLA into one program per device, with collectives
(all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all) where devices exchange data.
`find_collectives` lists them from the compiled HLO text (`Compiled.as_text()`): each with its result
shapes (per device), its bytes, and the device groups it runs over. Group members are logical device ids,
positions in the program's device assignment (for a mesh: `mesh.devices.flat`), so `crosses_processes`
tells which collectives join devices of different processes: the traffic that goes between hosts.

`collective_seconds` times them inside the real program: it runs the program under `jax.profiler`
and sums, per device, the trace events named after the collectives' HLO instructions (on CPU, the
client's per-device threads record one event per executed instruction). A collective's time includes
its wait for the slowest peer: the cost of synchronizing, as well as of moving bytes.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<type>.+?) (?P<op>" + "|".join(OPS) + r")(?P<start>-start)?\("
)
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_LISTED_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[(?P<axes>[^\]]*)\]"
    r"(?:,\s*device_ids=\((?P<ids>\[[\d,]+\](?:T\([\d,]+\))?|[\d,]+)\))?\s*\{(?P<grouped>[^}]*)\}"
)
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program.

    name: the HLO instruction's name (the profiler's event name); op: one of `OPS`; shapes: (dtype, dims)
    of its result on one device (several for a combined collective); bytes: their size; groups: the logical
    device ids of each group that runs it together (for collective-permute, each source-target pair), None
    when the HLO spells them in a form this module does not read.
    """

    name: str
    op: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    bytes: int
    groups: tuple[tuple[int, ...], ...] | None


def find_collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """Every collective of the compiled HLO module `hlo_text` over `num_devices` devices, in program order."""
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        shapes = tuple(
            (dtype, tuple(int(size) for size in dims.split(",") if size))
            for dtype, dims in _SHAPE.findall(match["type"])
            if dtype in DTYPE_BYTES
        )
        if match["start"] and match["op"] != "all-reduce" and len(shapes) == 2:
            shapes = shapes[1:]  # an async start's type is (operand, result)
        size = sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes)
        groups = device_groups(line, num_devices)
        found.append(Collective(match["name"], match["op"], shapes, size, groups))
    return found


def device_groups(instruction: str, num_devices: int) -> tuple[tuple[int, ...], ...] | None:
    """The device groups of one HLO collective instruction, in any of XLA's three spellings: listed
    ({{0,1},{2,3}}), iota ([2,2]<=[4] or [2,2]<=[2,2]T(1,0)) or mesh axes (mesh['x'=2,'y'=2] {'y'}); for
    collective-permute its source-target pairs. Empty braces are one group of all devices; None: unread."""
    if match := _PAIRS.search(instruction):
        return tuple(tuple(int(i) for i in pair.split(",")) for pair in re.findall(r"\{(\d+,\d+)\}", match[1]))
    if match := _LISTED_GROUPS.search(instruction):
        groups = tuple(tuple(int(i) for i in group.split(",") if i) for group in re.findall(r"\{([\d,]*)\}", match[1]))
        return groups or (tuple(range(num_devices)),)
    if match := _IOTA_GROUPS.search(instruction):
        return tuple(tuple(int(i) for i in row) for row in _iota(match[2], match[3]).reshape(_integers(match[1])))
    if match := _MESH_GROUPS.search(instruction):
        return _mesh_axis_groups(match["axes"], match["ids"], match["grouped"])
    return None


def _integers(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def _iota(dims: str, permutation: str | None) -> np.ndarray:
    """XLA's iota device list "[dims]T(permutation)": 0..n-1 laid out as `dims`, transposed."""
    ids = np.arange(math.prod(_integers(dims))).reshape(_integers(dims))
    return ids.transpose(_integers(permutation)) if permutation else ids


def _mesh_axis_groups(axes_text: str, ids_text: str | None, grouped_text: str) -> tuple[tuple[int, ...], ...] | None:
    """Groups of the mesh spelling: mesh positions numbered row-major over the axes, position p holding device
    `device_ids[p]` (p itself without device_ids); a group varies the listed axes, the others fixed."""
    if ":" in grouped_text or "(" in grouped_text:  # a sub-axis: not read
        return None
    axes = [(name, int(size)) for name, size in re.findall(r"'(\w+)'=(\d+)", axes_text)]
    names = [name for name, _ in axes]
    grouped = re.findall(r"'(\w+)'", grouped_text)
    count = math.prod(size for _, size in axes)
    if not set(grouped) <= set(names):
        return None
    if ids_text is None:
        devices = np.arange(count)
    elif ids_text.startswith("["):
        dims, _, permutation = ids_text[1:].partition("]")
        devices = _iota(dims, permutation[2:-1] or None).reshape(-1)
    else:
        devices = np.asarray(_integers(ids_text))
    if devices.size != count:
        return None
    positions = devices.reshape([size for _, size in axes])
    kept = [i for i, name in enumerate(names) if name not in grouped]
    positions = positions.transpose(kept + [names.index(name) for name in grouped])
    group_size = math.prod(size for name, size in axes if name in grouped)
    return tuple(tuple(int(i) for i in row) for row in positions.reshape(-1, group_size))


def crosses_processes(collective: Collective, device_processes: Sequence[int]) -> bool | None:
    """Whether some group of `collective` holds devices of several processes; `device_processes[i]` is the
    process of logical device i. None when its groups were not read."""
    if collective.groups is None:
        return None
    return any(len({device_processes[i] for i in group}) > 1 for group in collective.groups)


def profile_events(call: Callable[[], Any], calls: int) -> tuple[list[tuple[str, str, str, float]], float]:
    """(events, seconds per call) of `calls` calls of `call()`, each waited for, under `jax.profiler`: every
    trace event (plane, line, name, seconds) of this process, and the calls' mean wall time under the trace."""
    with tempfile.TemporaryDirectory(prefix="streamjax-trace-") as directory:
        jax.profiler.start_trace(directory)
        try:
            started = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(call())
            seconds = (time.perf_counter() - started) / calls
        finally:
            jax.profiler.stop_trace()
        traces = sorted(pathlib.Path(directory).rglob("*.xplane.pb"))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no trace under {directory}")
        data = jax.profiler.ProfileData.from_file(str(traces[-1]))
        events = [
            (plane.name, line.name, event.name, event.duration_ns * 1e-9)
            for plane in data.planes
            for line in plane.lines
            for event in line.events
        ]
    return events, seconds


def collective_seconds(
    events: list[tuple[str, str, str, float]], names: Sequence[str], calls: int, local_devices: int
) -> dict[str, dict[str, float]]:
    """Per collective name: `seconds` (mean per device per call) and `executions` (per device per call) from
    `profile_events` of `calls` calls; a name with no event is absent. Events are those of the devices'
    execution: the device planes' "XLA Ops" lines where there are any, else (CPU) XLA's host threads (lines
    "tf_...": the client's threads and the pool a program's parallel parts run on), never the Python thread."""
    on_devices = [event for event in events if event[0].startswith("/device:") and event[1] == "XLA Ops"]
    if not on_devices:
        on_devices = [event for event in events if event[0].startswith("/host:CPU") and event[1].startswith("tf_")]
    totals = {name: [0.0, 0] for name in names}
    for _, _, name, seconds in on_devices:
        if name in totals:
            totals[name][0] += seconds
            totals[name][1] += 1
    per_call = calls * local_devices
    return {
        name: {"seconds": total / per_call, "executions": count / per_call}
        for name, (total, count) in totals.items()
        if count
    }
