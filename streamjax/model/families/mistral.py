"""Mistral family: the Llama decoder (`families.llama`) from a Hugging Face `MistralConfig`.

A `sliding_window` shorter than `max_position_embeddings` limits every layer to that many most recent
keys (`ModelConfig.layer_types`, `ModelConfig.sliding_window`); null (Mistral v0.2 on) or at least the
context leaves every layer full.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamjax.model.config import ModelConfig, check_known_fields, sliding_window_options
from streamjax.model.families import llama

NAME = "mistral"
HF_MODEL_TYPES = ("mistral",)
TIED_HEAD = llama.TIED_HEAD

_HANDLED_FIELDS = llama.LLAMA_STYLE_FIELDS | {"sliding_window"}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `MistralConfig` dict."""
    check_known_fields(hf, _HANDLED_FIELDS, NAME)
    return llama.llama_style_config(hf, NAME, **sliding_window_options(hf, NAME))


layer_specs = llama.layer_specs
final_norm_specs = llama.final_norm_specs
hf_tensor_rules = llama.hf_tensor_rules
decoder_layer = llama.decoder_layer
final_norm = llama.final_norm
