r"""Paper Table 2: how many initial tokens to keep as sinks (0, 1, 2, 4, 8) at a fixed cache size.

Each variant keeps `num_sinks` sinks and `cache - num_sinks` recent tokens (0 sinks is window
attention), all in one invocation; the runs are named streaming-<S>+<W>.

    python -m experiments.ppl --config=configs/ppl_sinks.py --workdir=/tmp/streamjax/ppl_sinks

Argument keys: num_tokens (default 4096), cache (default 1024), e.g.

    python -m experiments.ppl --config=configs/ppl_sinks.py:cache=2048,num_tokens=8192 \
        --workdir=/tmp/streamjax/ppl_sinks_2048

One variant alone is the base config with overrides, e.g. 2 sinks:

    python -m experiments.ppl --config=configs/ppl.py --config.num_sinks=2 --config.window=1022 \
        --workdir=/tmp/streamjax/ppl_sinks_2

Prints the markdown table (one row per number of sinks) at the end.
"""

from configs import common, ppl

NUM_SINKS = (0, 1, 2, 4, 8)


def get_config(arg=None):
    """StreamingLLM with 0, 1, 2, 4 and 8 sinks and the same total cache."""
    arg = common.parse_arg(arg, num_tokens=4096, cache=1024)
    config = ppl.get_config()
    config.method = "streaming"
    config.num_tokens = arg.num_tokens
    config.window = arg.cache - 4
    config.variants = [{"num_sinks": sinks, "window": arg.cache - sinks} for sinks in NUM_SINKS]
    return config
