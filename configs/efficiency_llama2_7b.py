r"""Efficiency benchmark at Llama-2-7B's shape, random weights in bfloat16, for an accelerator.

Nothing is loaded: the weights are drawn at random (they do not change any cost). Command (from the
repository root), on a machine whose default JAX backend is a GPU or TPU with >= 40 GB of memory:

    python -m experiments.efficiency --config=configs/efficiency_llama2_7b.py --workdir=/tmp/streamjax/efficiency_7b

The long stream is really streamed to token 100,000 with the chunk route (about 20 TFLOP per 1,000
tokens). Fields are documented in `configs/efficiency.py`.
"""

import ml_collections

from configs import efficiency


def get_config(arg=None):
    """Llama-2-7B (32 layers, D 4096, 32 heads, MHA, F 11008, V 32000) in bfloat16, accelerator-sized runs."""
    config = efficiency.get_config(arg)
    config.model = "random"
    config.random_model = ml_collections.ConfigDict(
        {
            "family": "llama", "vocab_size": 32000, "hidden_size": 4096, "num_layers": 32, "num_heads": 32,
            "num_kv_heads": 32, "head_dim": 128, "intermediate_size": 11008, "norm_eps": 1e-5, "tie_embeddings": False,
            "max_position_embeddings": 4096, "rope_theta": 10000.0,
        }
    )  # fmt: skip
    config.dtype = "bfloat16"
    config.repeats, config.recompute_repeats, config.route_repeats = 20, 5, 3
    config.chunk_route_tokens, config.token_route_tokens = 8192, 1024
    config.long_stream_streamed = True
    config.bandwidth_bytes, config.matmul_size = 4 << 30, 8192
    return config
