"""Reading collectives from compiled HLO: their groups in XLA's three spellings, shapes, bytes, which cross
processes, and their times from trace events; hand-written instructions and events with known answers. Real
compiled programs and traces of two processes: tests/experiments/test_efficiency_mesh.py."""

from __future__ import annotations

import pytest

from streamjax.runs import collectives

# Instructions as XLA:CPU prints them (the mesh spelling is copied from a compiled program of jax 0.10.2).
LISTED = (
    "  %all-gather = f32[256,64]{1,0} all-gather(%param.1), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, "
    "dimensions={0}, use_global_device_ids=true"
)
IOTA = (
    "  %all-reduce.3 = bf16[8,32]{1,0} all-reduce(%x), channel_id=4, replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add"
)
MESH = (
    "  ROOT %all-gather.2 = f32[8,256,256]{2,1,0} all-gather(%wrapped_copy), channel_id=3, "
    "replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}, dimensions={0}, use_global_device_ids=true"
)
TUPLE = (
    "  %all-reduce.20 = (f32[], s32[], f32[8,32,1]{2,1,0}) all-reduce(%a, %b, %c), channel_id=9, "
    "replica_groups={}, use_global_device_ids=true, to_apply=%add.1"
)
MESH_WITH_DEVICES = (  # as jax 0.10.2 prints the "model" axis of a data=2,model=4 mesh, devices reordered
    "  %all-reduce = f32[1,1,64]{2,1,0} all-reduce(%s), channel_id=4, replica_groups=mesh['axis_0'=4,'axis_1'=1,"
    "'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, use_global_device_ids=true, to_apply=%add.1.clone"
)
LISTED_DEVICES = (
    "  %all-reduce.1 = f32[2]{0} all-reduce(%s), replica_groups=mesh['x'=2,'y'=2], device_ids=(3,1,2,0) {'x'}"
)
PERMUTE = "  %collective-permute.1 = f32[4]{0} collective-permute(%y), channel_id=5, source_target_pairs={{0,4},{1,2}}"
UNREAD = "  %all-to-all = f32[4]{0} all-to-all(%z), replica_groups=mesh['x'=2,'y'=4] {'y':(1)2}, dimensions={0}"


def test_groups_in_each_spelling():
    assert collectives.device_groups(LISTED, 8) == ((0, 1, 2, 3), (4, 5, 6, 7))
    # [2,4]<=[4,2]T(1,0): iota(8) as 4 x 2, transposed, read as 2 groups of 4
    assert collectives.device_groups(IOTA, 8) == ((0, 2, 4, 6), (1, 3, 5, 7))
    # groups vary axis_0 (size 2): devices that differ only in their row of the 2 x 1 x 4 mesh
    assert collectives.device_groups(MESH, 8) == ((0, 4), (1, 5), (2, 6), (3, 7))
    # positions 0..7 of the 4 x 1 x 2 mesh hold devices 0,4,1,5,2,6,3,7; a group varies axis_0
    assert collectives.device_groups(MESH_WITH_DEVICES, 8) == ((0, 1, 2, 3), (4, 5, 6, 7))
    # positions of the 2 x 2 mesh hold devices 3,1 / 2,0; a group varies x
    assert collectives.device_groups(LISTED_DEVICES, 4) == ((3, 2), (1, 0))
    assert collectives.device_groups(TUPLE, 8) == (tuple(range(8)),)
    assert collectives.device_groups(PERMUTE, 8) == ((0, 4), (1, 2))
    assert collectives.device_groups(UNREAD, 8) is None


def test_shapes_bytes_and_crossing():
    hlo = "\n".join(["%fusion = f32[4]{0} fusion(%p), kind=kLoop", LISTED, IOTA, MESH, TUPLE, PERMUTE, UNREAD])
    found = collectives.find_collectives(hlo, 8)
    assert [c.name for c in found] == [
        "all-gather", "all-reduce.3", "all-gather.2", "all-reduce.20", "collective-permute.1", "all-to-all",
    ]  # fmt: skip
    assert [c.op for c in found] == ["all-gather", "all-reduce", "all-gather", "all-reduce", "collective-permute",
                                     "all-to-all"]  # fmt: skip
    assert found[1].shapes == (("bf16", (8, 32)),)
    assert found[3].shapes == (("f32", ()), ("s32", ()), ("f32", (8, 32, 1)))
    assert [c.bytes for c in found] == [256 * 64 * 4, 8 * 32 * 2, 8 * 256 * 256 * 4, 4 + 4 + 8 * 32 * 4, 16, 16]
    processes = [0, 0, 0, 0, 1, 1, 1, 1]  # devices 0-3 in process 0, 4-7 in process 1
    assert [collectives.crosses_processes(c, processes) for c in found] == [False, True, True, True, True, None]


def test_seconds_from_trace_events():
    events = [
        ("/host:CPU", "tf_XLAPjRtCpuClient/1", "all-reduce", 0.004),
        ("/host:CPU", "tf_XLAEigen/2", "all-reduce", 0.002),
        ("/host:CPU", "tf_XLAEigen/2", "end: all-reduce", 1.0),  # a marker, not the op
        ("/host:CPU", "python", "all-reduce", 1.0),  # not a device's thread
        ("/host:CPU", "tf_XLAEigen/2", "fusion", 1.0),
    ]
    measured = collectives.collective_seconds(events, ["all-reduce", "all-gather"], calls=1, local_devices=2)
    assert measured == {"all-reduce": {"seconds": pytest.approx(0.003), "executions": 1.0}}
    device_events = [("/device:GPU:0", "XLA Ops", "all-reduce", 0.5), *events]  # device planes win where present
    measured = collectives.collective_seconds(device_events, ["all-reduce"], calls=2, local_devices=1)
    assert measured == {"all-reduce": {"seconds": 0.25, "executions": 0.5}}
