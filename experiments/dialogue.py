"""The streaming dialogue experiment: a thin entry point to `streamjax.dialogue.run`.

python -m experiments.dialogue --config=configs/dialogue.py --workdir=/tmp/streamjax/dialogue
"""

from absl import app

from experiments import common
from streamjax import dialogue

_CONFIG, _WORKDIR = common.define_flags(
    "A configs/dialogue*.py file (fields: configs/dialogue.py).",
    "Directory for dialogue.json, results.md, replies.md and the plots.",
)


def main(argv):
    common.run(argv, dialogue.run, _CONFIG, _WORKDIR)


if __name__ == "__main__":
    app.run(main)
