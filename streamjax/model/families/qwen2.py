"""Qwen2 family (Qwen2, Qwen2.5): the Llama decoder (`families.llama`) with q, k and v biases and no
output-projection bias, from a Hugging Face `Qwen2Config`.

Sliding windows by transformers' rule (`config.sliding_layers`): with `use_sliding_window`, the layers
whose `layer_types` entry is "sliding_attention" (without `layer_types`, those from `max_window_layers` on)
see their `sliding_window` most recent keys (`ModelConfig.layer_types`, `ModelConfig.sliding_window`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamjax.model.config import SLIDING_WINDOW_FIELDS, ModelConfig, check_known_fields, sliding_window_options
from streamjax.model.families import llama

NAME = "qwen2"
HF_MODEL_TYPES = ("qwen2",)
TIED_HEAD = llama.TIED_HEAD

_HANDLED_FIELDS = llama.LLAMA_STYLE_FIELDS | SLIDING_WINDOW_FIELDS
# What transformers' Qwen2Config and Qwen3Config assume of the sliding-window fields a config.json omits.
SLIDING_DEFAULTS = {"use_sliding_window": False, "max_window_layers": 28}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `Qwen2Config` dict (its q, k and v projections always have biases)."""
    check_known_fields(hf, _HANDLED_FIELDS, NAME)
    return llama.llama_style_config(hf, NAME, qkv_bias=True, **sliding_window_options(hf, NAME, SLIDING_DEFAULTS))


layer_specs = llama.layer_specs
final_norm_specs = llama.final_norm_specs
hf_tensor_rules = llama.hf_tensor_rules
decoder_layer = llama.decoder_layer
final_norm = llama.final_norm
