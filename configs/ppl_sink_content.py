r"""Paper Table 1: does the sinks' content matter? Four "\n" tokens as sinks vs the text's first four.

Variants, all StreamingLLM runs with a cache of `cache` tokens, in one invocation:
    streaming-0+1024       no sinks (window attention)
    streaming-4+1020       the text's first 4 tokens are the sinks
    streaming-4nl+1020     four "\n" tokens (SmolLM2 id 198, each tokenized alone) put before the
                           text are the sinks

The paper replaces the first four tokens with "\n"; here they are put before the text instead, so
every run scores exactly the same predictions (text tokens 1, 2, ...; the predictions of the
prefix tokens and of text token 0 are dropped).

    python -m experiments.ppl --config=configs/ppl_sink_content.py --workdir=/tmp/streamjax/ppl_sink_content

Argument keys: num_tokens (default 4096), cache (default 1024), e.g.
`--config=configs/ppl_sink_content.py:cache=2048`. Prints the markdown table at the end.
"""

from configs import common, ppl


def get_config(arg=None):
    """Window attention vs text sinks vs "\\n" sinks at the same cache size."""
    arg = common.parse_arg(arg, num_tokens=4096, cache=1024)
    config = ppl.get_config()
    config.method = "streaming"
    config.num_tokens = arg.num_tokens
    config.window = arg.cache - 4
    config.variants = [
        {"num_sinks": 0, "window": arg.cache},
        {"num_sinks": 4, "window": arg.cache - 4},
        {
            "name": f"4nl+{arg.cache - 4}",
            "num_sinks": 4,
            "window": arg.cache - 4,
            "sink_prefix": "\n",
            "sink_prefix_repeat": 4,
        },
    ]
    return config
