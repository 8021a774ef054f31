r"""Does a hybrid model need attention sinks? Gemma 3 270M (5 sliding layers of 512 keys : 1 full layer).

Gemma 3's 15 sliding layers never see a token more than 511 back; only its 3 full-attention layers
(5, 11 and 17) see the whole text, and only they are where StreamingLLM's cache (S + W) applies. Runs,
all over the same text and scoring the same predictions:
    dense-all               the model's own attention: full layers see every token, sliding layers slide
    window-0+W              the full layers keep the last W tokens, no sinks
    streaming-4+W-4         the full layers keep the first 4 tokens and the last W - 4
    streaming-4+W-4-slide4  the same, and the sliding layers keep the first 4 tokens too (an ablation:
                            their own attention never sees them once they are 512 back)
for each cache size W of `caches`; the sliding layers keep their 511 recent tokens in every run.

    python -m experiments.ppl --config=configs/ppl_gemma3.py --workdir=/tmp/streamjax/ppl_gemma3

Argument keys: num_tokens (default 40960, past the model's 32,768 positions), caches (default "256-1024":
cache sizes joined by "-"), data (default austen), e.g. `--config=configs/ppl_gemma3.py:num_tokens=8192`.
"""

from configs import common, ppl


def get_config(arg=None):
    """Dense, window and StreamingLLM on Gemma 3's full layers, with and without sinks on its sliding layers."""
    arg = common.parse_arg(arg, num_tokens=40960, caches="256-1024", data="austen")
    config = ppl.get_config()
    config.model = "gemma3"
    config.data = arg.data
    config.num_tokens = arg.num_tokens
    config.method = "streaming"
    config.variants = [{"name": "all", "method": "dense"}]
    for cache in (int(size) for size in str(arg.caches).split("-")):
        config.variants += [
            {"name": f"0+{cache}", "method": "window", "num_sinks": 0, "window": cache},
            {"name": f"4+{cache - 4}", "num_sinks": 4, "window": cache - 4},
            {"name": f"4+{cache - 4}-slide4", "num_sinks": 4, "window": cache - 4, "sliding_sinks": 4},
        ]
    return config
