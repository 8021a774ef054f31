r"""Paper Figure 5: one long stream through StreamingLLM (4 sinks + 1020 recent tokens), with its cost.

    python -m experiments.ppl --config=configs/ppl_long.py --workdir=/tmp/streamjax/ppl_long

SmolLM2-135M reads Jane Austen's six novels and then Moby Dick (about 1.31M tokens, concatenated as
the paper concatenates PG19 books) with StreamingLLM at 4+1020 over the first `num_tokens` tokens,
and window attention (the last 1024 tokens, no sinks) over the first `window_tokens`, enough to show
its collapse. The run is resumable (kill it, or send SIGTERM / Ctrl-C, and start the same command
again); `segments.png` and `segments.json` give log PPL, ms per token and resident memory every
10,000 predictions, `log_ppl.png` the cumulative and moving-window log PPL.

Argument keys: num_tokens (default 1000000), window_tokens (default 20480). The 4-million-token
version needs a text of 4M tokens, e.g. the PG19 test set (100 books), on an accelerator:

    python -m experiments.ppl --config=configs/ppl_long.py:num_tokens=4000000 \
        --config.data=/path/to/pg19 --config.dtype=bfloat16 --workdir=/tmp/streamjax/ppl_long_4m
"""

from configs import common, ppl


def get_config(arg=None):
    """StreamingLLM 4+1020 over num_tokens tokens, window attention 0+1024 over window_tokens."""
    arg = common.parse_arg(arg, num_tokens=1_000_000, window_tokens=20_480)
    config = ppl.get_config()
    config.data = "austen+mobydick"
    config.num_tokens = arg.num_tokens
    config.variants = [
        {"name": "4+1020", "method": "streaming", "num_sinks": 4, "window": 1020},
        {"name": "0+1024", "method": "window", "num_sinks": 0, "window": 1024, "num_tokens": arg.window_tokens},
    ]
    config.checkpoint_every = 20_480
    config.plot_window = 10_000
    config.segment_tokens = 10_000
    return config
