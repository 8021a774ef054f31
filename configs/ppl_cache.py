r"""Paper Table 6: StreamingLLM perplexity vs cache size: 4 sinks + 252, 508, 1020 and 2044 recent tokens.

    python -m experiments.ppl --config=configs/ppl_cache.py --workdir=/tmp/streamjax/ppl_cache

Argument keys: num_tokens (default 4096), window_attention (default false: also run plain window
attention at each cache size), e.g.

    python -m experiments.ppl --config=configs/ppl_cache.py:num_tokens=8192,window_attention=true \
        --workdir=/tmp/streamjax/ppl_cache_8k

One cache size alone: `--config=configs/ppl.py --config.window=508`. Prints the markdown table at the end.
"""

from configs import common, ppl

WINDOWS = (252, 508, 1020, 2044)


def get_config(arg=None):
    """StreamingLLM (4 sinks) at four cache sizes."""
    arg = common.parse_arg(arg, num_tokens=4096, window_attention=False)
    config = ppl.get_config()
    config.method = "streaming,window" if arg.window_attention else "streaming"
    config.num_tokens = arg.num_tokens
    config.variants = [{"num_sinks": 4, "window": window} for window in WINDOWS]
    return config
