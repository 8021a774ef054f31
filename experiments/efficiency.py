"""Efficiency benchmark: a thin entry point to `streamjax.benchmark.run`.

python -m experiments.efficiency --config=configs/efficiency.py --workdir=/tmp/streamjax/efficiency
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from streamjax import benchmark

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/efficiency*.py file (fields: configs/efficiency.py)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for efficiency.json and the plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        results = benchmark.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError) as error:  # user errors: bad config, model or workdir
        sys.exit(f"error: {error}")
    for target in results["targets"]:
        print(f"{'met' if target['met'] else 'NOT met'}: {target['name']} = {target['value']:.3g} ({target['target']})")


if __name__ == "__main__":
    app.run(main)
