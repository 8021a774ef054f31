"""Model families. Each module provides `config_from_hf`, `param_specs`, `hf_tensor_rules`, `forward`."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from streamjax.config import ModelConfig, UnsupportedConfigError
from streamjax.models import falcon, gpt_neox, llama, mpt

FAMILIES: dict[str, ModuleType] = {"llama": llama, "mpt": mpt, "gpt_neox": gpt_neox, "falcon": falcon}
# Hugging Face `model_type` -> family module.
HF_MODEL_TYPES: dict[str, ModuleType] = {"llama": llama, "mpt": mpt, "gpt_neox": gpt_neox, "falcon": falcon}


def family(config: ModelConfig) -> ModuleType:
    """The module implementing `config.family`."""
    return FAMILIES[config.family]


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config dict, dispatched on its `model_type`."""
    model_type = hf_config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"model_type {model_type!r} is not supported; streamjax handles {sorted(HF_MODEL_TYPES)}"
        )
    return HF_MODEL_TYPES[model_type].config_from_hf(hf_config)
