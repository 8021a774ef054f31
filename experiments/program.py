"""What every experiment's command shares: `main(run)` turns `run(config, workdir)` into a program.

Each experiment file ends with `if __name__ == "__main__": main(run)`; the flags (--config, an
ml_collections config file, and --workdir) are defined when `main` is called, so importing an
experiment (from a test or a notebook) defines no flag. User errors (a bad config, model, text or
workdir, a full disk) end the program with their message and exit code 1; a run stopped by SIGTERM or
SIGINT after saving (`signals.Interrupted`) with its message and 128 + the signal's number.
"""

import os
import sys
from collections.abc import Callable
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from streamjax.files import assets
from streamjax.runs import signals


def main(run: Callable[[Any, str], Any]) -> None:
    """Run `run(config, workdir)` as a command with --config and --workdir flags (see `run`'s module)."""
    config = config_flags.DEFINE_config_file("config", None, "A configs/*.py file (its fields: see that file).")
    workdir = flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints; rerun to resume.")
    flags.mark_flags_as_required(["config", "workdir"])

    def program(argv: list[str]) -> None:  # returns None: absl exits with what main returns
        call(argv, run, config, workdir)

    app.run(program)


def call(argv: list[str], run: Callable[[Any, str], Any], config, workdir) -> Any:
    """`run(config, workdir)` with the flags' values, user errors turned into exit codes."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    enable_persistent_cache()
    try:
        return run(config.value, workdir.value)
    except signals.Interrupted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")


def enable_persistent_cache(directory: str | None = None) -> str:
    """Keep compiled programs on disk, so running the same configuration again does not compile again.

    `directory` defaults to `$STREAMJAX_COMPILATION_CACHE`, else `compilation_cache/` under streamjax's
    cache directory (`streamjax.files.assets.cache_dir`). Returns the directory used.
    """
    directory = (
        directory or os.environ.get("STREAMJAX_COMPILATION_CACHE") or str(assets.cache_dir() / "compilation_cache")
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory
