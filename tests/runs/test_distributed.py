"""Several processes, one run (`streamjax.runs.distributed`): the spec, and `experiments.ppl` as 2 processes.

The multi-process runs start 2 processes on localhost, each with 4 CPU devices (gloo between them), through
`tests/support/processes.py`: a free port, join and heartbeat timeouts of seconds, every process bounded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from streamjax.runs import distributed
from support import ppl_runs, processes
from support.ppl_runs import tiny_flags

tiny = ppl_runs.tiny  # the tiny random Llama and its word-level text


def test_spec_forms():
    assert distributed.parse("") is None and distributed.parse("off") is None
    settings = distributed.parse("coordinator=10.0.0.1:8476,num_processes=4,process_id=3,join_timeout=30")
    assert settings == distributed.Settings("10.0.0.1:8476", 4, 3, join_timeout=30, heartbeat_timeout=100)


def test_auto_reads_the_environment(monkeypatch):
    for name in distributed.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert distributed.parse("auto,heartbeat_timeout=20") == distributed.Settings(heartbeat_timeout=20)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.parse("auto") == distributed.Settings("node0:1234", 2, 1)
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"the environment .*process_id 2 is not below num_processes 2"):
        distributed.parse("auto")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("coordinator=localhost:1,num_processes=2", "lacks process_id"),
        ("coordinator=localhost,num_processes=2,process_id=0", "is not HOST:PORT"),
        ("coordinator=localhost:1,num_processes=2,process_id=2", "process_id 2 is not below num_processes 2"),
        ("coordinator=localhost:1,num_processes=0,process_id=0", "num_processes must be >= 1"),
        ("coordinator=localhost:1,num_processes=two,process_id=0", "num_processes must be a non-negative integer"),
        ("auto,process_id=0", "'auto' finds process_id itself"),
        ("auto,hosts=2", "'hosts=2' is not one of its keys"),
        ("coordinator=localhost:1,num_processes=2,process_id=0,process_id=1", "gives process_id twice"),
        ("auto,join_timeout=0", "join_timeout and heartbeat_timeout must be >= 1"),
    ],
)
def test_bad_specs_are_named(spec, problem):
    with pytest.raises(ValueError, match=problem):
        distributed.parse(spec)


def test_bad_spec_fails_before_jax_starts(tiny, tmp_path):
    """The command says what is wrong with the spec and writes nothing."""
    flags = [*tiny_flags(tiny), "--config.distributed=coordinator=localhost:1,num_processes=2,process_id=5"]
    finished = ppl_runs.run_entry_point(flags, tmp_path / "workdir")
    _, stderr = finished.communicate(timeout=120)
    assert finished.returncode == 1 and "process_id 5 is not below num_processes 2" in stderr
    assert not (tmp_path / "workdir").exists()


@pytest.fixture(scope="module")
def single_device(tiny, tmp_path_factory):
    """The streaming run's NLL in one process on one device (the reference)."""
    workdir = tmp_path_factory.mktemp("single")
    finished = ppl_runs.run_entry_point(tiny_flags(tiny, method="streaming"), workdir)
    _, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr
    return np.load(workdir / "streaming" / "nll.npy")


@pytest.fixture(scope="module")
def two_processes(tiny, tmp_path_factory):
    """(workdir, results) of the streaming run as 2 processes x 4 devices over a data=2,model=4 mesh, with
    checkpoints every 32 predictions (saved and removed by both processes together)."""
    workdir = tmp_path_factory.mktemp("two") / "workdir"
    flags = [*tiny_flags(tiny, method="streaming"), "--config.mesh=data=2,model=4"]
    results = processes.run(processes.experiment("ppl", flags, workdir), timeout=300)
    processes.assert_succeeded(results)
    return workdir, results


def test_two_processes_give_the_single_device_nll(single_device, two_processes):
    workdir, _ = two_processes
    nll = np.load(workdir / "streaming" / "nll.npy")
    # measured 9.5e-7 (heads split 4 ways: other sums' order); one process on 8 devices differs the same way
    np.testing.assert_allclose(nll, single_device, rtol=0, atol=3e-6)


def test_process_zero_alone_writes(two_processes):
    workdir, results = two_processes
    assert "| streaming |" in results[0].stdout and "| streaming |" not in results[1].stdout
    assert sorted(path.name for path in workdir.iterdir()) == [
        "config.json", "lock", "lock.process1", "log_ppl.png", "results.md", "segments.json", "segments.png",
        "streaming", "summary.json",
    ]  # fmt: skip
    assert json.loads((workdir / "config.json").read_text())["fingerprint"]["processes"] == 2
    assert not (workdir / "streaming" / "checkpoints").exists()


def test_restart_with_another_process_count_is_refused(tiny, two_processes, tmp_path):
    """The finished 2-process workdir, run again by one process on a mesh of 8 devices: refused, naming both."""
    workdir, _ = two_processes
    flags = [*tiny_flags(tiny, method="streaming"), "--config.mesh=data=2,model=4"]
    finished = ppl_runs.run_entry_point(flags, workdir, env=processes.environment(8))
    _, stderr = finished.communicate(timeout=120)
    assert finished.returncode == 1
    assert "processes: 2 in the workdir, 1 now" in stderr


def test_a_mesh_larger_than_every_process_device_is_refused(tiny, tmp_path):
    flags = [*tiny_flags(tiny, method="streaming"), "--config.mesh=data=4,model=4"]
    results = processes.run(processes.experiment("ppl", flags, tmp_path / "workdir"), timeout=180)
    for result in results:
        assert result.returncode == 1, result.stderr[-2000:]
        assert "config.mesh='data=4,model=4' does not fit the 2 processes' devices (4 each)" in result.stderr
        assert "needs 16 devices but there are 8" in result.stderr


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_process_alone_exits_within_the_join_timeout(tiny, tmp_path, process_id):
    """Process 1 without a coordinator, or process 0 without process 1: exit 1 after join_timeout, saying so."""
    flags = [*tiny_flags(tiny, method="streaming"), "--config.mesh=data=2,model=4"]
    spec = processes.spec(processes.free_port(), 2, process_id, join_timeout=5)
    command = processes.experiment("ppl", flags, tmp_path / "workdir")(spec)
    began = time.monotonic()
    finished = subprocess.run(
        command, cwd=processes.REPO, env=processes.environment(4), capture_output=True, text=True, timeout=120
    )
    seconds = time.monotonic() - began
    assert finished.returncode == 1
    expected = "process 0 waited 5 s" if process_id == 0 else "process 1 could not join the coordinator at localhost"
    assert f"error: distributed run: {expected}" in finished.stderr
    assert seconds < 5 + 60  # the join timeout, and starting Python and JAX on a shared machine
    assert not (tmp_path / "workdir").exists()


def test_initialize_after_jax_has_computed_is_refused(tmp_path):
    """In a process that has already used JAX the spec cannot take effect: a ValueError, not a silent single run."""
    script = (
        "import jax, jax.numpy as jnp\n"
        "from streamjax.runs import distributed\n"
        "jnp.ones(2).block_until_ready()\n"
        "distributed.initialize('coordinator=localhost:1,num_processes=2,process_id=0,join_timeout=5')\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], cwd=processes.REPO, env=processes.environment(4), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert (
        finished.returncode == 1 and "ValueError: distributed=" in finished.stderr and "cannot start" in finished.stderr
    )


def test_a_signal_to_one_process_stops_both_at_the_same_step(tiny, two_processes, tmp_path):
    """SIGTERM to process 1 in its third segment of 16 (checkpoints every 32): both processes save after 48
    predictions and exit 143, and the two run again end with the uninterrupted run's NLL, bitwise."""
    fields = json.loads(json.dumps(ppl_runs.tiny_config(tiny, method="streaming").to_dict()))
    workdir, ready = tmp_path / "workdir", tmp_path / "ready"

    def command(spec: str) -> list[str]:
        moment = "signal:streaming:3" if ",process_id=1," in spec else "signal:streaming:99"  # 99: never
        overrides = json.dumps({**fields, "mesh": "data=2,model=4", "distributed": spec})
        killed_run = str(processes.REPO / "tests" / "support" / "killed_run.py")
        return [sys.executable, killed_run, overrides, str(workdir), moment, str(ready)]

    started = processes.start(command)
    deadline = time.monotonic() + 240
    while not ready.is_file():
        assert time.monotonic() < deadline and all(process.poll() is None for process in started), "never got there"
        time.sleep(0.1)
    started[1].send_signal(signal.SIGTERM)
    ready.with_name("ready.sent").touch()
    for result in processes.wait(started, timeout=180):
        assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
        assert "stopped by SIGTERM: run streaming saved after 48 of 96 predictions" in result.stderr
    flags = [*tiny_flags(tiny, method="streaming"), "--config.mesh=data=2,model=4"]
    resumed = processes.run(processes.experiment("ppl", flags, workdir), timeout=300)
    processes.assert_succeeded(resumed)
    assert "resuming streaming from its checkpoint after 48 of 96 predictions" in resumed[1].stderr
    uninterrupted, _ = two_processes
    assert (workdir / "streaming" / "nll.npy").read_bytes() == (uninterrupted / "streaming" / "nll.npy").read_bytes()
