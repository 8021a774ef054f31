"""Endless multi-turn chat in constant memory: a thin entry point to `streamjax.chat.run_chat`.

python -m experiments.chat --config=configs/chat.py --workdir=/tmp/streamjax/chat
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from streamjax import chat, compile

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/chat*.py file (fields: configs/chat.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for transcript.jsonl and summary.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    compile.enable_persistent_cache()
    try:
        chat.run_chat(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError) as error:  # user errors: bad config, script, model or workdir
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
