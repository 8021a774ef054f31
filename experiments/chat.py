"""Endless multi-turn chat in constant memory: a thin entry point to `streamjax.chat.run_chat`.

python -m experiments.chat --config=configs/chat.py --workdir=/tmp/streamjax/chat
"""

from absl import app

from experiments import common
from streamjax import chat

_CONFIG, _WORKDIR = common.define_flags(
    "A configs/chat*.py file (fields: configs/chat.py).", "Directory for transcript.jsonl and summary.json."
)


def main(argv):
    common.run(argv, chat.run_chat, _CONFIG, _WORKDIR)


if __name__ == "__main__":
    app.run(main)
