r"""Control for configs/ppl_long.py: fresh StreamingLLM streams started deep inside the same text.

    python -m experiments.ppl --config=configs/ppl_long_control.py --workdir=/tmp/streamjax/ppl_long_control

Five streams of `num_tokens` tokens at 4+1020, each a fresh start (BOS, then the text from token
`skip_tokens` on) at 0, 250K, 500K, 750K and 980K tokens into Austen + Moby Dick. Past their first
1,024 tokens they read the same text with the same cache budget as the one long stream at that point,
so comparing their NLL with the long run's over the same tokens tells the text's difficulty apart from
any drift of a stream that has been running for a million tokens (README, "A million tokens").

Argument keys: num_tokens (default 10240).
"""

from configs import common, ppl

SKIPS = (0, 250_000, 500_000, 750_000, 980_000)


def get_config(arg=None):
    """StreamingLLM 4+1020, one fresh stream per offset in SKIPS."""
    arg = common.parse_arg(arg, num_tokens=10_240)
    config = ppl.get_config()
    config.data = "austen+mobydick"
    config.method = "streaming"
    config.num_tokens = arg.num_tokens
    config.variants = [{"name": f"from {skip}", "skip_tokens": skip} for skip in SKIPS]
    config.checkpoint_every = 0
    config.plot_window = 1024
    config.segment_tokens = 1024
    return config
