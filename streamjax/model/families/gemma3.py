"""Gemma 3 family (text): the Gemma decoder of `families.gemma2` with per-head query and key norms
(`qk_norm`, Gemma's 1 + w convention folded at load) and RoPE settings per layer type, from a Hugging
Face `Gemma3TextConfig` (model_type "gemma3_text"; the multimodal "gemma3" config is not converted).

Without `layer_types`, every `sliding_window_pattern`-th layer (default 6) is full and the rest slide,
as transformers derives them. RoPE: transformers 5 keeps one mapping per layer type in
`rope_parameters` ({"full_attention": {...}, "sliding_attention": {...}}); an older config.json has
`rope_theta` and `rope_scaling` for the full layers and `rope_local_base_freq` for the sliding ones
(defaults 1,000,000 and 10,000). The sliding layers' settings become `ModelConfig.sliding_rope_theta`
and `sliding_rope_scaling`. `final_logit_softcapping` is applied; `attn_logit_softcapping` is refused,
because transformers' Gemma 3 never applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamjax.model.config import LAYER_TYPES, ModelConfig, RopeSettings, check_known_fields, require, rope_from_hf
from streamjax.model.families import gemma2

NAME = "gemma3"
HF_MODEL_TYPES = ("gemma3_text",)
TIED_HEAD = gemma2.TIED_HEAD

# `_sliding_window_pattern` is transformers' record of the pattern, written by `to_dict` and never read.
_HANDLED_FIELDS = gemma2.GEMMA_FIELDS | {
    "rope_parameters", "rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern",
    "_sliding_window_pattern",
}  # fmt: skip

# transformers' `Gemma3TextConfig` defaults for the fields a config.json may omit.
CONFIG_DEFAULTS = {
    **gemma2.CONFIG_DEFAULTS, "max_position_embeddings": 131_072, "final_logit_softcapping": None,
    "attn_logit_softcapping": None, "sliding_window_pattern": 6, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}  # fmt: skip


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `Gemma3TextConfig` dict."""
    check_known_fields(hf, _HANDLED_FIELDS, NAME)
    hf = {**CONFIG_DEFAULTS, **hf}
    require(
        hf["attn_logit_softcapping"] is None,
        f"{NAME} attn_logit_softcapping={hf['attn_logit_softcapping']!r}: transformers' Gemma 3 does not apply "
        "it (Gemma 3 has no attention soft-capping), so its meaning is unclear; set it to null",
    )
    rope = rope_per_layer_type(hf)
    return gemma2.gemma_config(
        hf,
        NAME,
        layer_types_of(hf),
        rope["full_attention"],
        qk_norm=True,
        final_logit_softcap=hf["final_logit_softcapping"],
        sliding_rope_theta=rope["sliding_attention"].theta,
        sliding_rope_scaling=rope["sliding_attention"].scaling,
    )


def layer_types_of(hf: Mapping[str, Any]) -> list[str]:
    """Each layer's type: `layer_types`, or (without it) every `sliding_window_pattern`-th layer full."""
    if hf.get("layer_types") is not None:
        return list(hf["layer_types"])
    pattern = hf["sliding_window_pattern"]
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])]


def rope_per_layer_type(hf: Mapping[str, Any]) -> dict[str, RopeSettings]:
    """{layer type: RoPE settings} by transformers' rule: a type's `rope_parameters` entry, with the top-level
    `rope_scaling` merged into the full layers' and the top-level base (`rope_theta` for full layers,
    `rope_local_base_freq` for sliding ones) where the entry has none."""
    given = dict(hf.get("rope_parameters") or {})
    unknown = sorted(set(given) - set(LAYER_TYPES))
    require(
        not unknown,
        f"{NAME} rope_parameters has keys {unknown}: it must map each layer type {LAYER_TYPES} to its RoPE "
        'settings, e.g. {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0}, ...}',
    )
    scaling = dict(hf.get("rope_scaling") or {})
    require(
        "type" not in scaling,
        f"{NAME} rope_scaling names its type with the old key 'type', which transformers 5 ignores for Gemma 3 "
        "(it keeps the default RoPE): name it 'rope_type'",
    )
    full = {"rope_type": "default", **(given.get("full_attention") or {}), **scaling}
    sliding = {"rope_type": "default", **(given.get("sliding_attention") or {})}
    full.setdefault("rope_theta", hf["rope_theta"])
    sliding.setdefault("rope_theta", hf["rope_local_base_freq"])
    return {
        kind: rope_from_hf({"rope_parameters": settings}, f"{NAME} {kind}", gemma2.ROPE_TYPES)
        for kind, settings in (("full_attention", full), ("sliding_attention", sliding))
    }


layer_specs = gemma2.layer_specs
final_norm_specs = gemma2.final_norm_specs
hf_tensor_rules = gemma2.hf_tensor_rules
decoder_layer = gemma2.decoder_layer
final_norm = gemma2.final_norm
