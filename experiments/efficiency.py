"""Efficiency benchmark: a thin entry point to `streamjax.benchmark.run`.

python -m experiments.efficiency --config=configs/efficiency.py --workdir=/tmp/streamjax/efficiency
"""

from absl import app

from experiments import common
from streamjax import benchmark

_CONFIG, _WORKDIR = common.define_flags(
    "A configs/efficiency*.py file (fields: configs/efficiency.py).", "Directory for efficiency.json and the plots."
)


def main(argv):
    results = common.run(argv, benchmark.run, _CONFIG, _WORKDIR)
    for target in results["targets"]:
        print(f"{'met' if target['met'] else 'NOT met'}: {target['name']} = {target['value']:.3g} ({target['target']})")


if __name__ == "__main__":
    app.run(main)
