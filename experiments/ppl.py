"""Streaming perplexity with resumable runs: a thin entry point to `streamjax.experiment.run`.

python -m experiments.ppl --config=configs/ppl.py --workdir=/tmp/streamjax/ppl
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from streamjax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/ppl*.py file (fields: configs/ppl.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints; rerun to resume.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        experiment.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError) as error:  # user errors: bad config, data, model or workdir
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
