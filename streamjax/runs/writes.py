"""The files a run writes and reads back: atomic, durable writes and JSON read with a clear error.

Every result file of a long job (`experiments.ppl`, `experiments.pretrain`: nll.npy, timeline.json,
summary.json, results.md, the plots, the workdir's config.json) is written by `write_bytes` (or
`write_json`, `write_text`):

- atomic: the content goes to `<name>.partial` beside the file, which is renamed over it once complete,
  so a kill leaves the old file or the new one, never part of one;
- durable: the partial file is fsynced before the rename and its directory after it, so a power loss
  after the call cannot undo the rename or leave the name pointing at unwritten blocks;
- a full disk (or any other write error) removes the partial file and raises an `OSError` of the same
  errno naming the file; inside `on_full_disk(intact)` an ENOSPC error also says what is intact and how
  to resume, as a checkpoint save does (`streamjax.runs.checkpoints.save`).

A directory written beside its final name and renamed into place (a trained model, `streamjax.files.export`; a
tokenizer) is synced the same way: `fsync_tree` before the rename, `fsync` of its parent after.

`read_json` reads such a file back and turns a corrupt one (garbage, truncated, not the expected
object) into a `CorruptFile` error that names it and says what to do, never a raw `JSONDecodeError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any


class CorruptFile(ValueError):
    """A file a run wrote earlier that cannot be read back as what it should hold."""


def write_bytes(path: str | os.PathLike, content: bytes) -> None:
    """Write `content` to `path` atomically and durably (fsynced file, rename, fsynced directory).

    On any OSError the partial file is removed and an OSError of the same errno names `path`.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        code = error.errno or errno.EIO
        if code == errno.ENOSPC:
            raise OSError(
                code, f"no space left on the device while writing {path}; no partial file was left"
            ) from error
        raise OSError(code, f"could not write {path}: {error.strerror}; no partial file was left") from error
    fsync(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`write_bytes` of `text` in UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> None:
    """`write_bytes` of `value` as indented JSON and a newline."""
    write_bytes(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's content, or a directory's entries (a rename into it), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: str | os.PathLike) -> None:
    """`fsync` every file and directory under `directory`, then `directory` itself: before it is renamed into
    place, so that the name never points at files whose content is not on the disk yet."""
    for path in sorted(pathlib.Path(directory).rglob("*")):
        fsync(path)
    fsync(directory)


@contextlib.contextmanager
def on_full_disk(intact: str):
    """Inside the block, a full disk raises an ENOSPC OSError that adds `intact` (what is still whole, e.g.
    "run streaming's checkpoint(s) (32, 64) are intact") and how to resume to the message."""
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise OSError(
            errno.ENOSPC, f"{error.strerror}; {intact}: free some space and run the same command to resume"
        ) from error


def read_json(path: str | os.PathLike, remedy: str, keys: Iterable[str] = ()) -> Any:
    """The JSON value of `path`; `CorruptFile` naming the file and `remedy` (what to do, e.g. "delete it
    to compute the run again") when it is not JSON, or with `keys`, not an object holding all of them."""
    path = pathlib.Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFile(f"{path} is corrupt (not valid JSON: {error}); {remedy}") from None
    missing = [key for key in keys if not isinstance(value, dict) or key not in value]
    if missing:
        raise CorruptFile(f"{path} is corrupt (it holds no {', '.join(map(repr, missing))}); {remedy}")
    return value
