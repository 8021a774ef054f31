"""The efficiency benchmark on a mesh over two processes (2 x 4 CPU devices, jax.distributed over localhost):
the collectives of a decode step and a training step, where they go, their bytes and their time.

No timing is asserted beyond sense (the machine may be shared): collective time is positive and below the
step's, every collective was seen in the trace once per step, bytes are those of the HLO shapes.
"""

from __future__ import annotations

import json
import math

import pytest

from experiments import efficiency
from streamjax.runs import collectives
from support import processes

CONFIG = "--config=configs/efficiency_distributed.py"  # the tiny random Llama on data=1,model=8
QUICK = ["--config.repeats=2", "--config.warmup=1", "--config.mesh_traced_steps=2"]
HIDDEN, LAYERS = 64, 2  # of the config's model (configs/efficiency.py:small=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("efficiency_mesh")
    results = processes.run(processes.experiment("efficiency", [CONFIG, *QUICK], workdir), timeout=240)
    processes.assert_succeeded(results)
    assert sorted(path.name for path in workdir.iterdir()) == ["efficiency_mesh.json", "results.md"]  # process 0's
    report = json.loads((workdir / "efficiency_mesh.json").read_text())
    assert (workdir / "results.md").read_text() == efficiency.mesh_table(report) + "\n"
    return report


def test_the_mesh_spans_both_processes(report):
    mesh = report["mesh"]
    assert (mesh["axes"], mesh["processes"], mesh["devices"]) == ({"data": 1, "model": 8}, 2, 8)
    assert mesh["device_processes"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (report["meta"]["processes"], report["meta"]["local_devices"]) == (2, 4)


@pytest.mark.parametrize("step", ["decode", "train"])
def test_collectives_cross_processes_and_take_part_of_the_step(report, step):
    measured = report["mesh"][step]
    rows = measured["collectives"]
    assert rows and measured["untimed_collectives"] == measured["unread_groups"] == []
    for row in rows:
        assert row["op"] in collectives.OPS
        assert row["groups"] == [list(range(8))] and row["crosses_processes"] is True, row
        assert row["bytes"] == sum(collectives.DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in row["shapes"])
        assert row["executions_per_step"] == 1.0 and row["seconds_per_step"] > 0, row
    assert measured["collective_bytes"] == measured["cross_process_bytes"] == sum(row["bytes"] for row in rows)
    assert 0 < measured["collective_s"] == measured["cross_process_collective_s"] < measured["traced_step_s"]
    assert measured["collective_share"] == pytest.approx(measured["collective_s"] / measured["traced_step_s"])
    assert [entry["process"] for entry in measured["per_process"]] == [0, 1]
    for entry in measured["per_process"]:
        assert 0 < entry["cross_process_collective_s"] <= entry["collective_s"] < entry["traced_step_s"], entry
        assert entry["step_s"] > 0
    # the figures are process 0's; per_process went between processes as float32
    assert measured["per_process"][0]["collective_s"] == pytest.approx(measured["collective_s"], rel=1e-6)


def test_decode_sums_the_split_mlp_and_embedding_across_processes(report):
    """The model's 4 heads and 2 kv heads do not divide 8 devices (replicated: no collective); its MLP (128
    columns) and vocabulary (256) do: one all-reduce of the hidden state [B, 1, D] per layer's MLP and one
    for the embedding lookup."""
    rows = report["mesh"]["decode"]["collectives"]
    assert [(row["op"], row["shapes"], row["bytes"]) for row in rows] == [
        ("all-reduce", [["f32", [1, 1, HIDDEN]]], 4 * HIDDEN)
    ] * (LAYERS + 1)


def test_a_mesh_larger_than_the_processes_devices_is_refused(tmp_path):
    flags = [CONFIG, "--config.mesh=data=4,model=4"]
    results = processes.run(processes.experiment("efficiency", flags, tmp_path / "refused"), timeout=120)
    for result in results:
        assert result.returncode == 1, result.stderr[-2000:]
        assert "config.mesh='data=4,model=4' does not fit the 2 processes' devices (4 each)" in result.stderr
        assert "needs 16 devices but there are 8" in result.stderr
    assert not (tmp_path / "refused").exists()
