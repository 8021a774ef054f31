"""StreamEval: a thin entry point to `streamjax.streameval.run`.

python -m experiments.streameval --config=configs/streameval.py --workdir=/tmp/streamjax/streameval
"""

from absl import app

from experiments import common
from streamjax import streameval

_CONFIG, _WORKDIR = common.define_flags(
    "A configs/streameval*.py file (fields: configs/streameval.py).",
    "Directory for each run's queries.jsonl and summary.json, results.md and the plots.",
)


def main(argv):
    common.run(argv, streameval.run, _CONFIG, _WORKDIR)


if __name__ == "__main__":
    app.run(main)
