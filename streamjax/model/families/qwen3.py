"""Qwen3 family: the Llama decoder (`families.llama`) with a per-head RMSNorm of queries and keys
(`q_norm`, `k_norm` over the head dim, before RoPE, so the cache holds normed keys), from a Hugging
Face `Qwen3Config`. `head_dim` is the config's own (it need not be hidden_size / heads);
`attention_bias` gives the q, k, v and output projections biases.

Sliding windows by the rule of Qwen2 (`families.qwen2`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamjax.model.config import SLIDING_WINDOW_FIELDS, ModelConfig, check_known_fields, sliding_window_options
from streamjax.model.families import llama, qwen2

NAME = "qwen3"
HF_MODEL_TYPES = ("qwen3",)
TIED_HEAD = llama.TIED_HEAD

_HANDLED_FIELDS = llama.LLAMA_STYLE_FIELDS | SLIDING_WINDOW_FIELDS | {"attention_bias"}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `Qwen3Config` dict."""
    check_known_fields(hf, _HANDLED_FIELDS, NAME)
    return llama.llama_style_config(
        hf,
        NAME,
        attention_bias=hf.get("attention_bias", False),
        qk_norm=True,
        **sliding_window_options(hf, NAME, qwen2.SLIDING_DEFAULTS),
    )


layer_specs = llama.layer_specs
final_norm_specs = llama.final_norm_specs
hf_tensor_rules = llama.hf_tensor_rules
decoder_layer = llama.decoder_layer
final_norm = llama.final_norm
