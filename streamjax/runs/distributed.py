"""Several processes, one computation: JAX's multi-controller runtime (`jax.distributed`) under every experiment.

A TPU pod slice or a GPU cluster runs one process per host; `jax.distributed.initialize` joins them, and
from then on `jax.devices()` lists every process's devices, so a mesh (`streamjax.model.sharding`) spans
them all and the same sharding rules apply. Each process runs the same program on its own devices' shards;
XLA's collectives move what crosses hosts (over gloo on CPU, NCCL on GPU, ICI/DCN on TPU).

Every experiment's config has a `distributed` field, a spec:

    ""          off: one process (the default)
    "auto"      `jax.distributed.initialize()` finds the cluster itself (Cloud TPU, SLURM, Open MPI); the
                environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID give
                it what it cannot find
    "coordinator=HOST:PORT,num_processes=N,process_id=I"   explicit: process I of N, process 0 at HOST:PORT

Either form takes `join_timeout=SECONDS` (how long processes wait for each other to start, default 300)
and `heartbeat_timeout=SECONDS` (how soon the others stop after one dies, default 100), e.g.
"auto,join_timeout=60".

What a run does across processes (the experiments follow these rules):
- a process that cannot join within `join_timeout` (its coordinator unreachable, a process missing)
  exits with code 1 and a message saying which, never hangs;
- a process that dies mid-run is found by JAX's heartbeats: every other process is stopped by the
  runtime (SIGABRT) within about `heartbeat_timeout` seconds, its log naming the dead process ("The
  following tasks are unhealthy (stopped sending heartbeats):" and its number, or "Task N heartbeat
  timeout") or, when process 0 (the coordinator) died, saying that the leader task died;
- SIGTERM or SIGINT to any process makes every process save the same step and stop
  (`signals.StopRequests.requested` asks them all);
- process 0 writes results, plots, logs and the workdir's files (`is_writer`); every process saves and
  restores the orbax checkpoints together; `barrier` orders them where one writes what the others read.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from streamjax.runs import log

ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
EXAMPLE = "'auto' or 'coordinator=10.0.0.1:8476,num_processes=2,process_id=0'"
# JAX's own join deadline lies this much past ours, so that our message, not its abort, reports a failed join.
JOIN_GRACE_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class Settings:
    """A parsed `distributed` spec; None fields are left to JAX's cluster detection ("auto")."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    join_timeout: int = 300
    heartbeat_timeout: int = 100


def parse(spec: str) -> Settings | None:
    """The settings of a `distributed` spec (see the module), None for "" (off); ValueError names a bad one."""
    spec = str(spec or "").strip()
    if spec in ("", "off"):
        return None
    items = [item.strip() for item in spec.split(",") if item.strip()]
    auto = items[:1] == ["auto"]
    fields = {}
    for item in items[1:] if auto else items:
        key, equals, value = (piece.strip() for piece in item.partition("="))
        if not equals or key not in ("coordinator", "num_processes", "process_id", "join_timeout", "heartbeat_timeout"):
            raise ValueError(f"distributed={spec!r}: {item!r} is not one of its keys; write e.g. {EXAMPLE}")
        if key in fields:
            raise ValueError(f"distributed={spec!r} gives {key} twice")
        fields[key] = value if key == "coordinator" else _integer(spec, key, value)
    if auto:
        given = sorted(set(fields) & {"coordinator", "num_processes", "process_id"})
        if given:
            raise ValueError(f"distributed={spec!r}: 'auto' finds {', '.join(given)} itself; give them without 'auto'")
        return with_environment(Settings(**fields))
    missing = [key for key in ("coordinator", "num_processes", "process_id") if key not in fields]
    if missing:
        raise ValueError(f"distributed={spec!r} lacks {', '.join(missing)}; write e.g. {EXAMPLE}")
    return check(Settings(**fields), f"distributed={spec!r}")


def _integer(spec: str, key: str, value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"distributed={spec!r}: {key} must be a non-negative integer, got {value!r}")
    return int(value)


def with_environment(settings: Settings) -> Settings:
    """`settings` with what JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID say (for "auto")."""
    coordinator, processes, process = (os.environ.get(name, "").strip() or None for name in ENVIRONMENT)
    for name, value in zip(ENVIRONMENT[1:], (processes, process)):
        if value is not None and not value.isdigit():
            raise ValueError(f"environment variable {name}={value!r} is not a non-negative integer")
    settings = dataclasses.replace(
        settings,
        coordinator=coordinator,
        num_processes=None if processes is None else int(processes),
        process_id=None if process is None else int(process),
    )
    return check(settings, f"the environment ({', '.join(ENVIRONMENT)})")


def check(settings: Settings, where: str) -> Settings:
    """`settings`, or a ValueError naming `where` they came from when they cannot describe a run."""
    if settings.coordinator is not None:
        host, colon, port = settings.coordinator.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{where}: coordinator {settings.coordinator!r} is not HOST:PORT")
    if settings.num_processes is not None and settings.num_processes < 1:
        raise ValueError(f"{where}: num_processes must be >= 1, got {settings.num_processes}")
    if None not in (settings.num_processes, settings.process_id) and settings.process_id >= settings.num_processes:
        raise ValueError(
            f"{where}: process_id {settings.process_id} is not below num_processes {settings.num_processes} "
            "(processes are numbered 0 .. num_processes - 1)"
        )
    if settings.join_timeout < 1 or settings.heartbeat_timeout < 1:
        raise ValueError(f"{where}: join_timeout and heartbeat_timeout must be >= 1 second")
    return settings


def initialize(spec: str) -> None:
    """Join the processes of the `distributed` spec (nothing for ""), before any JAX computation.

    Called first by every experiment's `run`. Calling it again with the same spec does nothing. On CPU the
    processes' collectives go over gloo. A join that does not complete within `join_timeout` ends the
    process with exit code 1 and a message saying what was waited for.
    """
    settings = parse(spec)
    if settings is None:
        return
    if jax.distributed.is_initialized():
        if settings.num_processes not in (None, jax.process_count()):
            raise ValueError(
                f"this process already joined a run of {jax.process_count()} processes, not {settings.num_processes}"
            )
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    watchdog = threading.Timer(settings.join_timeout, _fail_to_join, args=(settings,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            initialization_timeout=settings.join_timeout + JOIN_GRACE_SECONDS,
            heartbeat_timeout_seconds=settings.heartbeat_timeout,
            # a process that fails leaves at once, and the shutdown barrier it meets tells the others soon
            shutdown_timeout_seconds=settings.heartbeat_timeout,
        )
    except RuntimeError as error:  # e.g. JAX already computed something in this process
        raise ValueError(f"distributed={spec!r} cannot start: {error}") from None
    finally:
        watchdog.cancel()
    log.log(
        "distributed",
        f"process {jax.process_index()} of {jax.process_count()} joined: {jax.local_device_count()} of "
        f"{jax.device_count()} devices here",
    )


def _fail_to_join(settings: Settings) -> None:
    """The join watchdog: say what did not happen and end the process (JAX's join blocks in C++)."""
    where = f"the coordinator at {settings.coordinator}" if settings.coordinator else "the detected coordinator"
    if settings.process_id == 0:
        problem = (
            f"process 0 waited {settings.join_timeout} s at {where} for the other "
            f"{(settings.num_processes or 2) - 1} process(es) to join; start every process with the same "
            "num_processes and coordinator, and check that they can reach this host and port"
        )
    else:
        problem = (
            f"process {settings.process_id if settings.process_id is not None else '?'} could not join {where} "
            f"within {settings.join_timeout} s: start process 0 there (with the same num_processes) and check "
            "that this host can reach that address and port"
        )
    print(f"error: distributed run: {problem}", file=sys.stderr, flush=True)
    os._exit(1)


def fingerprint() -> dict[str, int]:
    """What a workdir's fingerprint adds for a distributed run: its process count (nothing for one process,
    as before distributed runs), so that a restart with another count is refused, naming both counts."""
    return {"processes": jax.process_count()} if jax.process_count() > 1 else {}


def is_writer() -> bool:
    """Whether this process writes the run's files (results, plots, logs, the workdir's): process 0."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def writer_sees(fact: bool) -> bool:
    """Process 0's `fact` in every process: what a process sees on disk may change under it while process 0
    writes (a checkpoint directory created), so the processes take the path that process 0's view gives."""
    if jax.process_count() == 1:
        return fact
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(fact)))


def broadcast_text(text: str | None) -> str | None:
    """Process 0's `text` in every process (what the others pass is ignored); None stands for "no more",
    e.g. the end of the user's input, which only process 0 reads. With one process, `text` itself."""
    if jax.process_count() == 1:
        return text
    data = b"" if text is None else text.encode("utf-8")
    size = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if text is None else len(data))))
    if size < 0:
        return None
    buffer = np.frombuffer(data, np.uint8) if is_writer() else np.zeros(size, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode("utf-8")


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (each process calls this at the same point); `value` itself
    with one process, at no cost."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def same_everywhere(value: np.ndarray, what: str) -> None:
    """Raise ValueError naming `what` when a host value differs between processes (e.g. the tokens a
    run reads: each process reads its own copy of the text and the weights)."""
    if jax.process_count() > 1:
        try:
            multihost_utils.assert_equal(value, f"{what} differs between processes")
        except AssertionError as error:
            raise ValueError(str(error)) from None
