"""What every entry point shares: the --config and --workdir flags, quiet logging, the persistent
compilation cache, and user errors (a bad config, model, text or workdir) as one line and exit 1."""

import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from streamjax import compile, experiment


def define_flags(config_help: str, workdir_help: str):
    """The required --config (an ml_collections config file) and --workdir flags."""
    config = config_flags.DEFINE_config_file("config", None, config_help)
    workdir = flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])
    return config, workdir


def run(argv: list[str], function: Callable[[Any, str], Any], config, workdir) -> Any:
    """`function(config, workdir)` with the flags' values. A ValueError or OSError (a user error: bad config, data,
    model or workdir, a full disk) ends the program with its message and exit code 1; a run stopped by SIGTERM
    or SIGINT after saving (`experiment.Interrupted`) with its message and 128 + the signal's number."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    compile.enable_persistent_cache()
    try:
        return function(config.value, workdir.value)
    except experiment.Interrupted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
