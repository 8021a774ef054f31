"""A long job's working directory: one run at a time (a lock), and only the config it was started with.

Every job writes `workdir/config.json` holding `{"fingerprint": {field: value}}`, the config fields that
decide its numbers; a restart compares its own fingerprint with the saved one and refuses a different
config, naming each field that differs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax

from streamjax.runs import writes

REMEDY = (
    "if the workdir holds runs of the config you are running, delete the file and run the same command "
    "(it is written again, and each checkpoint is checked against the config on its own); else use another "
    "--workdir"
)


# Fingerprint fields left out at their usual value (so that workdirs made before them still match): that value.
ABSENT_MEANS = {"processes": 1}  # `streamjax.runs.distributed.fingerprint`


def saved_fingerprint(workdir: pathlib.Path) -> dict[str, Any] | None:
    """The fingerprint in `workdir/config.json`, None if no run started there; raises if `workdir` is a
    file, or `writes.CorruptFile` if config.json cannot be read."""
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"workdir {workdir} is a file, not a directory; pass a directory path")
    path = workdir / "config.json"
    if not path.is_file():
        return None
    return writes.read_json(path, REMEDY, keys=["fingerprint"])["fingerprint"]


def check_fingerprint(
    workdir: pathlib.Path, saved: Mapping[str, Any], current: Mapping[str, Any], ignore: tuple[str, ...] = ()
) -> None:
    """Raise ValueError naming every field (but those in `ignore`) whose value in the workdir's saved
    fingerprint differs from the current config's."""

    def value(fingerprint: Mapping[str, Any], key: str) -> Any:
        return fingerprint.get(key, ABSENT_MEANS.get(key))

    differences = [
        f"{key}: {value(saved, key)!r} in the workdir, {value(current, key)!r} now"
        for key in sorted((set(saved) | set(current)) - set(ignore))
        if value(saved, key) != value(current, key)
    ]
    if differences:
        raise ValueError(
            f"workdir {workdir} holds a run of a different config ({'; '.join(differences)}); "
            "use another --workdir or delete this one"
        )


class WorkdirInUse(OSError):
    """Another process holds the workdir's lock."""


def lock_name() -> str:
    """The lock file of this process: `lock` for process 0 (the only one of most runs), `lock.process<i>` for
    process i of a distributed run (`streamjax.runs.distributed`), so that each process of a run holds
    its own and a second run on the workdir meets process 0's."""
    index = jax.process_index() if jax.distributed.is_initialized() else 0
    return "lock" if index == 0 else f"lock.process{index}"


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
    """Hold an exclusive lock on `workdir` (an flock on `workdir/lock`, or `lock.process<i>`: `lock_name`) or
    raise `WorkdirInUse` at once.

    The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a dead run
    never leaves the workdir locked. The file says which process holds it; it is never deleted.
    """
    handle = open(workdir / lock_name(), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process"
        handle.close()
        raise WorkdirInUse(
            errno.EBUSY,
            f"workdir {workdir} is in use by another run ({holder}); wait for it to end or stop it, "
            "or use another --workdir",
        ) from None
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()
