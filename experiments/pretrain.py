"""Pre-training with attention sinks (the paper's Table 3): a thin entry point to `streamjax.pretraining.run`.

python -m experiments.pretrain --config=configs/pretrain_sink.py --workdir=/tmp/streamjax/pretrain
"""

from absl import app

from experiments import common
from streamjax import pretraining

_CONFIG, _WORKDIR = common.define_flags(
    "A configs/pretrain*.py file (fields: configs/pretrain_sink.py).",
    "Directory for the tokenizer, checkpoints, trained models and results; rerun to resume.",
)


def main(argv):
    common.run(argv, pretraining.run, _CONFIG, _WORKDIR)


if __name__ == "__main__":
    app.run(main)
