"""Model families: one module per architecture, each implementing the protocol below, and the registry.

A family module defines (checked by `register`, which reads nothing else from it):

    NAME                  the `ModelConfig.family` it implements, e.g. "llama"
    HF_MODEL_TYPES        the Hugging Face `model_type`s it converts, e.g. ("llama",)
    TIED_HEAD             (head, embedding): Hugging Face names of the output head and the input
                          embedding, so a tied checkpoint that carries both is accepted when equal
    config_from_hf(hf)    ModelConfig from a Hugging Face config dict; refuses fields it does not handle
    layer_specs(config)   {name: ParamSpec} of one decoder layer (`streamjax.model.params`)
    final_norm_specs(config)  {name: ParamSpec} of the final norm, at the top level of the params
    hf_tensor_rules(config)   [TensorRule] mapping every checkpoint tensor onto a param
    decoder_layer(p, x, layer_cache, plan, config) -> (x, LayerOutputs)
                          one layer: its params p, activations x [B, T, D], its `attention.LayerCache`
                          (None without a cache) and the chunk's `cache.ChunkPlan`
    final_norm(params, x, config) -> x   the norm before the head

What every family shares is written once: the embedding and the head (`params.model_specs`,
`params.head_rules`, `streamjax.model.transformer`), the attention layer (`attention.self_attention`), building
blocks (`families.blocks`) and RoPE settings from a Hugging Face config (`config.rope_from_hf`).
Adding a family is one such file plus its name in the registration loop at the end; a family that
differs from another only in its config (Qwen2, Qwen3 and Mistral from Llama) takes that family's
functions for the rest (Gemma 3 from Gemma 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from streamjax.model.config import ModelConfig, UnsupportedConfigError
from streamjax.model.families import falcon, gemma2, gemma3, gpt_neox, llama, mistral, mpt, qwen2, qwen3
from streamjax.model.params import model_specs

_FUNCTIONS = ("config_from_hf", "layer_specs", "final_norm_specs", "hf_tensor_rules", "decoder_layer", "final_norm")


@dataclasses.dataclass(frozen=True)
class Family:
    """A registered family: the protocol's constants and functions (see the module docstring)."""

    name: str
    hf_model_types: tuple[str, ...]
    tied_head: tuple[str, str]
    config_from_hf: Callable[[Mapping[str, Any]], ModelConfig]
    layer_specs: Callable[[ModelConfig], dict]
    final_norm_specs: Callable[[ModelConfig], dict]
    hf_tensor_rules: Callable[[ModelConfig], list]
    decoder_layer: Callable
    final_norm: Callable

    @classmethod
    def from_module(cls, module: ModuleType) -> Family:
        """The family a module implements; TypeError naming what the module lacks."""
        missing = [name for name in ("NAME", "HF_MODEL_TYPES", "TIED_HEAD") if not hasattr(module, name)]
        missing += [name for name in _FUNCTIONS if not callable(getattr(module, name, None))]
        if missing:
            raise TypeError(f"family module {module.__name__} lacks {', '.join(missing)} (see streamjax.families)")
        functions = {name: getattr(module, name) for name in _FUNCTIONS}
        return cls(module.NAME, tuple(module.HF_MODEL_TYPES), tuple(module.TIED_HEAD), **functions)

    def param_specs(self, config: ModelConfig) -> dict:
        """Specs of every param (a pytree matching the params)."""
        return model_specs(config, self.layer_specs(config), self.final_norm_specs(config))


FAMILIES: dict[str, Family] = {}


def register(module: ModuleType) -> Family:
    """Add a family module to the registry (after checking it implements the protocol)."""
    family = Family.from_module(module)
    taken = {hf_type for other in FAMILIES.values() if other.name != family.name for hf_type in other.hf_model_types}
    clashes = sorted(taken & set(family.hf_model_types))
    if clashes:
        raise ValueError(f"family {family.name!r} claims Hugging Face model types already registered: {clashes}")
    FAMILIES[family.name] = family
    return family


def get(config: ModelConfig) -> Family:
    """The registered family of `config`."""
    if config.family not in FAMILIES:
        raise UnsupportedConfigError(f"model family {config.family!r} is not registered; known: {sorted(FAMILIES)}")
    return FAMILIES[config.family]


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config dict, by the family that converts its `model_type`."""
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family.config_from_hf(hf_config)
    known = sorted(hf_type for family in FAMILIES.values() for hf_type in family.hf_model_types)
    raise UnsupportedConfigError(f"model_type {model_type!r} is not supported; streamjax handles {known}")


def param_specs(config: ModelConfig) -> dict:
    """Specs of every param of `config`'s model (shape, logical axes, init)."""
    return get(config).param_specs(config)


for _module in (llama, qwen2, qwen3, mistral, gemma2, gemma3, mpt, gpt_neox, falcon):
    register(_module)
