r"""Efficiency benchmark on Gemma 3 270M (float32), a hybrid model: 15 sliding layers of 512 keys, 3 full-attention.

The cache sizes of every row (256..4096, StreamingLLM at 4 + 1020 for routes, generation and the long stream)
are those of the 3 full-attention layers; the 15 sliding layers keep their own ring of 511 tokens in every row
(dense included: the model's own attention slides there). Beside it, transformers' own generation of the same
GGUF with its own sliding-window cache, measured in the same run (the optional peer; imports torch). Command
(from the repository root):

    python -m experiments.efficiency --config=configs/efficiency_gemma3.py --workdir=/tmp/streamjax/efficiency_gemma3

A tiny random hybrid Gemma 3 (5 sliding layers of 8 keys, 1 full) at small sizes, no peer, for a quick check:

    python -m experiments.efficiency --config=configs/efficiency_gemma3.py:small=True --workdir=/tmp/streamjax/eff_g3

Fields are documented in `configs/efficiency.py`.
"""

import math

import ml_collections

from configs import efficiency
from configs.common import parse_arg


def get_config(arg=None):
    """Gemma 3 270M with the transformers peer; the long stream streamed to token 10,000 (8.8 of the 4 + 1020
    caches past its end, 19 of the sliding layers' rings), a tenth of SmolLM2's 100,000 to keep the run short:
    a chunk-route token costs Gemma 3 1.6x the FLOPs of SmolLM2 (618 M against 375 M; its 262,144-token head)."""
    options = parse_arg(arg, small=False)
    config = efficiency.get_config(arg)
    if options.small:
        config.random_model = _tiny_gemma3()
        return config
    config.model = "gemma3"
    config.transformers_peer = True
    config.early_position, config.late_position, config.memory_positions = 1_000, 10_000, (5_000, 10_000)
    return config


def _tiny_gemma3() -> ml_collections.ConfigDict:
    """Gemma 3's layout at toy size: layers 0-4 slide over 8 keys (rings of 7), layer 5 is full attention."""
    return ml_collections.ConfigDict(
        {
            "family": "gemma3", "vocab_size": 256, "hidden_size": 64, "num_layers": 6, "num_heads": 4,
            "num_kv_heads": 1, "head_dim": 16, "intermediate_size": 128, "norm_eps": 1e-6, "tie_embeddings": True,
            "max_position_embeddings": 4096, "qk_norm": True, "hidden_act": "gelu_pytorch_tanh",
            "rope_theta": 1_000_000.0, "sliding_rope_theta": 10_000.0, "attention_scale": 0.25,
            "embedding_multiplier": math.sqrt(64), "layer_types": ("sliding_attention",) * 5 + ("full_attention",),
            "sliding_window": 8,
        }
    )  # fmt: skip
