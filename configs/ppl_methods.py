r"""Paper Figure 3: log PPL vs input length for dense, window, (recompute) and StreamingLLM.

The cache is half of SmolLM2's 8192-token training window: 4 sinks + 4092 recent tokens (window
attention: the last 4096 tokens). The text (12288 tokens of Pride and Prejudice) runs past the
training window, where dense attention degrades, and past the cache, where window attention fails.

    python -m experiments.ppl --config=configs/ppl_methods.py --workdir=/tmp/streamjax/ppl_methods

Smaller or larger (argument keys: num_tokens, cache, recompute):

    python -m experiments.ppl --config=configs/ppl_methods.py:num_tokens=6144 --workdir=/tmp/streamjax/ppl_methods_6k

Cost on a CPU (measured on 2 shared cores, so an upper bound): window and streaming about 18
tokens/s (about 11 minutes each for 12288 tokens); dense about 5 tokens/s (its cache is sized for
the whole text from the first chunk, about 40 minutes). `recompute` (sliding window with
re-computation) is off by default: every prediction is a fresh forward pass over `cache` tokens,
minutes per token on a CPU; turn it on with `:recompute=true` on an accelerator. Prints the
comparison table at the end; the plot is <workdir>/log_ppl.png.
"""

from configs import common, ppl


def get_config(arg=None):
    """Methods vs tokens at a cache of half the training window."""
    arg = common.parse_arg(arg, num_tokens=12288, cache=4096, recompute=False)
    config = ppl.get_config()
    config.method = "dense,window,streaming" + (",recompute" if arg.recompute else "")
    config.num_sinks = 4
    config.window = arg.cache - config.num_sinks
    config.num_tokens = arg.num_tokens
    config.checkpoint_every = 2048
    return config
