"""What made a result: the command and commit, the config as plain values, digests of the inputs."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shlex
import subprocess
import sys
from typing import Any

import numpy as np

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


def made_by() -> str:
    """ "<command line> @ <commit>": what made a result, for plot footers and JSON. The commit is the
    repository's HEAD ("+dirty" with uncommitted changes to tracked files), or "unknown" outside git."""
    git = lambda *args: subprocess.run(
        ["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, timeout=10
    )  # noqa: E731
    try:
        head, status = git("rev-parse", "--short=12", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        commit = (
            head.stdout.strip() + ("+dirty" if status.stdout.strip() else "") if head.returncode == 0 else "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    program = sys.argv[0] if sys.argv else "python"
    module = (
        os.path.splitext(os.path.relpath(program, REPOSITORY))[0].replace(os.sep, ".")
        if program.endswith(".py")
        else program
    )
    return f"python -m {module} {shlex.join(sys.argv[1:])} @ {commit}".replace("  ", " ")


def plain_config(config) -> dict[str, Any]:
    """An ml_collections config (or a mapping) as a plain dict, for JSON."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def tokens_sha256(tokens: np.ndarray) -> str:
    """SHA-256 of token ids as int32 bytes: which tokens a run read, in a summary."""
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()
