"""The streaming dialogue experiment: a thin entry point to `streamjax.dialogue.run`.

python -m experiments.dialogue --config=configs/dialogue.py --workdir=/tmp/streamjax/dialogue
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from streamjax import compile, dialogue

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/dialogue*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for dialogue.json, results.md, replies.md and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    compile.enable_persistent_cache()
    try:
        dialogue.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
