"""Streaming perplexity with resumable runs: a thin entry point to `streamjax.experiment.run`.

python -m experiments.ppl --config=configs/ppl.py --workdir=/tmp/streamjax/ppl
"""

from absl import app

from experiments import common
from streamjax import experiment

_CONFIG, _WORKDIR = common.define_flags(
    "A configs/ppl*.py file (fields: configs/ppl.py).", "Directory for outputs and checkpoints; rerun to resume."
)


def main(argv):
    common.run(argv, experiment.run, _CONFIG, _WORKDIR)


if __name__ == "__main__":
    app.run(main)
