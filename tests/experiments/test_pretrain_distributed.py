"""The pre-training experiment (`experiments.pretrain`) as 2 `jax.distributed` processes of 4 CPU devices each on
localhost (`support.processes`), on a data=8 mesh that spans both: it trains as one process of 8 devices does
with the same global batch, a process killed mid-run stops the other and the rerun resumes to the uninterrupted
run's params, and a workdir is resumed only with the process count that started it."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from streamjax.files import weights
from streamjax.runs import distributed
from support import processes

pytestmark = pytest.mark.real_assets

FIELDS = {
    "vocab_size": 512, "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.intermediate_size": 96, "sample_length": 32, "batch_size": 8, "steps": 12,
    "learning_rate": 1e-2, "warmup_steps": 4, "eval_cache": 16, "eval_sinks": "4", "eval_tokens": 64,
    "evaluate_every": 0, "heldout_samples": 8, "chunk_size": 16, "checkpoint_every": 5, "matmul_repeats": 1,
    "seeds": "0", "variants": "vanilla", "mesh": "data=8",
}  # fmt: skip
KILLED_AT_STEP = 8  # process 1 stops before its 8th step; the checkpoint of step 5 is on disk
TIMEOUT = 240


@pytest.fixture(scope="module")
def text_file(austen_text, tmp_path_factory) -> pathlib.Path:
    """The first 100,000 characters of Austen, as a corpus file."""
    path = tmp_path_factory.mktemp("text") / "austen_start.txt"
    path.write_text(austen_text.read_text()[:100_000])
    return path


def flags(text_file: pathlib.Path) -> list[str]:
    return ["--config=configs/pretrain_sink.py", f"--config.data={text_file}"] + [
        f"--config.{name}={value}" for name, value in FIELDS.items()
    ]


def run_one_process(text_file: pathlib.Path, workdir: pathlib.Path) -> subprocess.CompletedProcess:
    """`python -m experiments.pretrain` as one process of 8 CPU devices (no `distributed`)."""
    command = [sys.executable, "-m", "experiments.pretrain", *flags(text_file), f"--workdir={workdir}"]
    return subprocess.run(
        command, cwd=processes.REPO, env=processes.environment(8), capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.fixture(scope="module")
def two_processes(text_file, tmp_path_factory) -> pathlib.Path:
    """The workdir of an uninterrupted run of 2 processes x 4 devices."""
    workdir = tmp_path_factory.mktemp("two_processes")
    results = processes.run(processes.experiment("pretrain", flags(text_file), workdir), timeout=TIMEOUT)
    processes.assert_succeeded(results)
    assert "| vanilla |" in results[0].stdout and "| vanilla |" not in results[1].stdout  # process 0 reports
    return workdir


@pytest.fixture(scope="module")
def one_process(text_file, tmp_path_factory) -> pathlib.Path:
    """The workdir of the same run as one process of 8 devices."""
    workdir = tmp_path_factory.mktemp("one_process")
    finished = run_one_process(text_file, workdir)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return workdir


def history(workdir: pathlib.Path) -> dict:
    return json.loads((workdir / "seed0" / "vanilla" / "summary.json").read_text())["history"]


def trained(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    return weights.read_safetensors(workdir / "seed0" / "vanilla" / "model" / "model.safetensors")


def test_two_processes_train_as_one_process_of_8_devices_with_the_same_global_batch(two_processes, one_process):
    """Both split each step's 8 samples over 8 devices (one per device); across processes the gradient's
    all-reduce goes over gloo, which adds in another order, so the numbers agree to float32 rounding. Measured
    (2 shared cores): losses to 1.5e-7 relative (3 of 12 steps differ), gradient norms to 9.0e-8, params to
    9.7e-8 absolute (7.6e-7 of a tensor's largest entry), perplexities to 1.5e-8, held-out losses equal;
    the bounds are about 3x those."""
    got, want = history(two_processes), history(one_process)
    assert len(got["loss"]) == FIELDS["steps"]
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=5e-7)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=3e-7)
    for got_row, want_row in zip(got["evaluations"], want["evaluations"], strict=True):
        assert got_row["step"] == want_row["step"]
        assert got_row["heldout_loss"] == pytest.approx(want_row["heldout_loss"], rel=5e-8)
        assert got_row["ppl"] == pytest.approx(want_row["ppl"], rel=5e-8)
    got_params, want_params = trained(two_processes), trained(one_process)
    assert sorted(got_params) == sorted(want_params)
    for name, value in want_params.items():
        np.testing.assert_allclose(got_params[name], value, rtol=0, atol=3e-7, err_msg=name)
    written = {path.name for path in two_processes.iterdir()}  # one of each file, by process 0; a lock per process
    assert written == {"config.json", "lock", "lock.process1", "tokenizer", "seed0", "results.md", "summary.json",
                       "loss.png"}  # fmt: skip
    assert json.loads((two_processes / "config.json").read_text())["fingerprint"]["processes"] == 2


def killed_command(text_file: pathlib.Path, workdir: pathlib.Path, ready: pathlib.Path):
    """Process 1 stops before its step `KILLED_AT_STEP` (touching ready1) and waits to be killed; process 0
    touches ready0 as it reaches that step and goes on into it (`support/killed_pretrain.py`)."""
    overrides = {"data": str(text_file), **FIELDS}

    def command(spec: str) -> list[str]:
        process = distributed.parse(spec).process_id
        moment = f"running:{KILLED_AT_STEP}" if process == 0 else f"step:{KILLED_AT_STEP}"
        config = json.dumps({**overrides, "distributed": spec})
        script = str(processes.REPO / "tests" / "support" / "killed_pretrain.py")
        return [sys.executable, script, config, str(workdir), moment, str(ready / f"ready{process}")]

    return command


def test_a_killed_process_stops_the_other_and_the_rerun_resumes_to_the_same_params(two_processes, text_file, tmp_path):
    workdir = tmp_path / "w"
    started = processes.start(killed_command(text_file, workdir, tmp_path))
    deadline = time.monotonic() + TIMEOUT
    while not all((tmp_path / f"ready{process}").exists() for process in (0, 1)):
        ended = [process.poll() for process in started]
        assert ended == [None, None], f"a process ended before step {KILLED_AT_STEP}: {processes.wait(started, 10)}"
        assert time.monotonic() < deadline, f"the processes never reached step {KILLED_AT_STEP}"
        time.sleep(0.05)
    started[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor, killed = processes.wait(started, timeout=processes.HEARTBEAT_TIMEOUT + 60)
    stopped_after = time.monotonic() - killed_at
    assert killed.returncode == -signal.SIGKILL
    # Measured: JAX's runtime aborted process 0 (SIGABRT) 8 s after the kill, with a heartbeat timeout of 10 s.
    assert survivor.returncode != 0 and stopped_after < processes.HEARTBEAT_TIMEOUT + 30, (stopped_after, survivor)
    dead = re.search(r"The following tasks are unhealthy \(stopped sending heartbeats\):\s+(\d+)\s", survivor.stderr)
    assert dead and dead[1] == "1", survivor.stderr[-3000:]
    assert "Terminating process because the JAX distributed service detected fatal errors" in survivor.stderr

    resumed = processes.run(processes.experiment("pretrain", flags(text_file), workdir), timeout=TIMEOUT)
    processes.assert_succeeded(resumed)
    assert history(workdir)["starts"] == [0, 5]
    uninterrupted = history(two_processes)
    for name in ("loss", "grad_norm", "learning_rate", "evaluations"):
        assert history(workdir)[name] == uninterrupted[name], name
    got, want = trained(workdir), trained(two_processes)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[name], want[name]) for name in want)


def test_a_workdir_resumes_only_with_the_process_count_that_started_it(two_processes, one_process, text_file):
    alone = run_one_process(text_file, two_processes)
    assert alone.returncode == 1, alone.stderr[-3000:]
    assert "different config (processes: 2 in the workdir, 1 now)" in alone.stderr, alone.stderr[-3000:]
    together = processes.run(processes.experiment("pretrain", flags(text_file), one_process), timeout=TIMEOUT)
    for result in together:
        assert result.returncode == 1, result.stderr[-3000:]
        assert "different config (processes: 1 in the workdir, 2 now)" in result.stderr, result.stderr[-3000:]
        assert "seed 0 vanilla" not in result.stderr  # refused before training
