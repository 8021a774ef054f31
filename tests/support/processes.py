"""One command run as several cooperating processes on this machine: `jax.distributed` over localhost.

Each process is a child with its own CPU devices (`JAX_NUM_CPU_DEVICES`), told its place by the
`distributed` spec its command line gets (`streamjax.runs.distributed`); the coordinator's port is a
free one, and every process is bounded by a timeout (all are killed when one overruns).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[2]
# The tests' bounds on joining and on noticing a dead process (seconds): short, so a failure shows soon.
JOIN_TIMEOUT = 60
HEARTBEAT_TIMEOUT = 10


@dataclasses.dataclass
class Finished:
    """What one process left: its exit code, its output and how long it ran (s)."""

    process_id: int
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def free_port() -> int:
    """A TCP port no one listens on now (the coordinator binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def spec(port: int, num_processes: int, process_id: int, **timeouts) -> str:
    """The `distributed` spec of process `process_id` of `num_processes`, coordinator on localhost:`port`."""
    settings = {"join_timeout": JOIN_TIMEOUT, "heartbeat_timeout": HEARTBEAT_TIMEOUT, **timeouts}
    extra = "".join(f",{key}={value}" for key, value in settings.items())
    return f"coordinator=localhost:{port},num_processes={num_processes},process_id={process_id}{extra}"


def environment(devices: int) -> dict[str, str]:
    """A child's environment: JAX on `devices` CPU devices, the repository importable."""
    path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONPATH": path}


def start(command: Callable[[str], list[str]], num_processes: int = 2, devices: int = 4, port: int | None = None,
          **timeouts) -> list[subprocess.Popen]:  # fmt: skip
    """Start `command(spec)` (an argv) once per process, each with its own spec and `devices` CPU devices."""
    port = port or free_port()
    return [
        subprocess.Popen(
            command(spec(port, num_processes, process_id, **timeouts)),
            cwd=REPO,
            env=environment(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process_id in range(num_processes)
    ]


def wait(processes: list[subprocess.Popen], timeout: float) -> list[Finished]:
    """Every process's `Finished`; all are killed if the last has not ended `timeout` s after this call."""
    begun, results = time.monotonic(), []
    for process_id, process in enumerate(processes):
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, timeout - (time.monotonic() - begun)))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            outputs = [other.communicate() for other in processes]
            raise AssertionError(
                f"process {process_id} ran past {timeout} s; their stderr tails:\n"
                + "\n".join(f"--- process {i}:\n{err[-3000:]}" for i, (_, err) in enumerate(outputs))
            ) from None
        results.append(Finished(process_id, process.returncode, stdout, stderr, time.monotonic() - begun))
    return results


def run(command: Callable[[str], list[str]], num_processes: int = 2, devices: int = 4, timeout: float = 300,
        **timeouts) -> list[Finished]:  # fmt: skip
    """`start` then `wait`: every process's `Finished`."""
    return wait(start(command, num_processes, devices, **timeouts), timeout)


def experiment(module: str, flags: list[str], workdir: pathlib.Path) -> Callable[[str], list[str]]:
    """The command line of `python -m experiments.<module>` with `flags`, `workdir` and a `distributed` spec."""
    return lambda spec: [
        sys.executable, "-m", f"experiments.{module}", *flags, f"--workdir={workdir}", f"--config.distributed={spec}",
    ]  # fmt: skip


def assert_succeeded(results: list[Finished]) -> None:
    """Fail, with the stderr of each failed process, unless every process exited 0."""
    failed = [result for result in results if result.returncode != 0]
    assert not failed, "\n".join(
        f"process {result.process_id} exited {result.returncode}:\n{result.stderr[-4000:]}" for result in failed
    )
