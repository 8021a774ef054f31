"""Resumable state on disk: orbax steps that are verified before they are resumed from.

Both long jobs, streaming evaluation (`experiments.ppl`) and training (`streamjax.training`),
save a pytree of arrays and a JSON metadata dict per step through these functions:

- saves are synchronous (the state's arrays are donated to the next jitted step right after), written
  by orbax to a `*.orbax-checkpoint-tmp*` directory and renamed once complete, so a kill mid-save
  leaves the previous step intact; `remove_partial_steps` deletes such leftovers, synchronously
  (orbax's own cleanup runs in a thread per manager, and two managers of one directory would race);
- every step's metadata holds `step` and `digest`, a SHA-256 of its arrays and of the rest of its
  metadata (`state_digest`: a run's position, timeline or loss history included); `restore_latest`
  resumes from the newest step that reads back and hashes to its digest, and moves any step that does
  not to `corrupt_checkpoints/` beside the directory (never deleting it). Steps saved before the digest
  covered the metadata (their digest is of the arrays alone) are set aside the same way, with a note
  saying so: such a run starts over from its first step;
- a full disk while saving raises an ENOSPC `OSError` that names the steps still intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from streamjax.model import sharding
from streamjax.runs import distributed, log


class CorruptCheckpoint(Exception):
    """A checkpoint step that cannot be read back as it was saved."""


class Restored(NamedTuple):
    """A step read back: its number, its array tree and its metadata."""

    step: int
    tree: Any
    meta: dict


def manager(directory: pathlib.Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A synchronous orbax manager of `directory` that leaves partial steps to `remove_partial_steps`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, cleanup_tmp_directories=False
    )
    return ocp.CheckpointManager(directory, options=options)


def remove_partial_steps(directory: pathlib.Path) -> None:
    """Delete the temporary directories of saves that never completed (a kill or a full disk mid-save); in a
    distributed run, process 0 deletes them while the others wait."""
    if distributed.is_writer():
        for partial in directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
    distributed.barrier(f"checkpoints: partial steps of {directory} removed")


def state_digest(tree, meta: dict | None = None) -> str:
    """SHA-256 of every array of a checkpoint's tree (shape, dtype and bytes, in tree order) and of its
    metadata `meta` but "digest" (as JSON with sorted keys): saved with each checkpoint and checked on
    restore, so flipped or missing bytes, or an altered position or timeline, are never resumed from.
    Without `meta`, the digest of the arrays alone (what steps saved before held)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        array = np.ascontiguousarray(sharding.to_host(leaf))
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    if meta is not None:
        digest.update(json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True).encode())
    return digest.hexdigest()


def save(checkpoints: ocp.CheckpointManager, step: int, tree, meta: dict, what: str) -> None:
    """Save `tree` (arrays) and `meta` (JSON) as `step`; `what` says what the step holds in the ENOSPC
    message (e.g. "the checkpoint after 64 predictions")."""
    meta = dict(meta, step=step)
    items = {
        "state": ocp.args.StandardSave(tree),
        "meta": ocp.args.JsonSave(dict(meta, digest=state_digest(tree, meta))),
    }
    try:
        checkpoints.save(step, args=ocp.args.Composite(**items))
    except Exception as error:
        if not is_disk_full(error):
            raise
        remove_partial_steps(pathlib.Path(checkpoints.directory))
        kept = [saved for saved in checkpoints.all_steps() if saved != step]
        raise OSError(
            errno.ENOSPC,
            f"no space left on the device while saving {what} in {checkpoints.directory} "
            f"({error.__class__.__name__}); the checkpoint(s) saved before ({', '.join(map(str, kept)) or 'none'}) "
            "are intact: free some space and run the same command to resume",
        ) from error


def is_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def restore_latest(
    directory: pathlib.Path, abstract, check_meta: Callable[[dict, pathlib.Path], None]
) -> Restored | None:
    """The newest sound step of `directory`, or None when there is none (or no directory).

    `abstract` is the tree's structure (`jax.ShapeDtypeStruct`s with shardings: restored onto the same
    shards; numpy arrays: restored as numpy). A step that cannot be read or does not hash to its digest
    is moved aside (`quarantine`) and the one before it is tried. `check_meta(meta, path)` raises for a
    sound step that belongs to another job (another config or text): that is the user's error, not a
    corruption, so it propagates.
    """
    if not distributed.writer_sees(directory.is_dir()):
        return None
    remove_partial_steps(directory)
    checkpoints = manager(directory)
    try:
        for step in sorted(checkpoints.all_steps(), reverse=True):
            try:
                restored = _restore_step(checkpoints, step, abstract)
            except CorruptCheckpoint as problem:
                quarantine(directory, step, str(problem))
                continue
            check_meta(restored.meta, directory / str(step))
            return restored
    finally:
        checkpoints.close()
    return None


def _restore_step(checkpoints: ocp.CheckpointManager, step: int, abstract) -> Restored:
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    try:
        restored = checkpoints.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax and tensorstore raise many types for missing or mangled files
        raise CorruptCheckpoint(f"it cannot be read: {error.__class__.__name__}: {str(error)[:300]}") from error
    meta = restored.meta
    if not isinstance(meta, dict) or "digest" not in meta or "step" not in meta:
        raise CorruptCheckpoint("its metadata has no digest or step")
    if meta["step"] != step:
        raise CorruptCheckpoint(f"its metadata says step {meta['step']}")
    digest = state_digest(restored.state, meta)
    if digest != meta["digest"]:
        if state_digest(restored.state) == meta["digest"]:
            raise CorruptCheckpoint(
                "it was saved before checkpoints covered their metadata: its digest is of its arrays alone"
            )
        raise CorruptCheckpoint(
            f"its arrays and metadata hash to {digest[:16]}..., not to the {meta['digest'][:16]}... saved"
        )
    return Restored(step, restored.state, meta)


def quarantine(directory: pathlib.Path, step: int, problem: str) -> None:
    """Move a bad checkpoint step aside (never delete it), and say so."""
    target = directory.parent / "corrupt_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if distributed.is_writer():  # every process found the same step corrupt (the same digest check)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(directory / str(step)), target)
    distributed.barrier(f"checkpoints: step {step} of {directory} set aside")
    message = f"checkpoint {directory / str(step)} is corrupt ({problem}); moved to {target}, trying the one before"
    log.log("checkpoints", message)
