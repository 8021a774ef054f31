"""Model configuration: one frozen, hashable dataclass shared by every model family.

A `ModelConfig` is a static argument of every jitted function, so it must be hashable: mappings are
stored as sorted tuples of items. Each family builds it from a Hugging Face config dict and refuses
fields it does not handle (`check_known_fields`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

# Fields every Hugging Face config carries that do not change the forward pass of a causal LM.
HF_METADATA_FIELDS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "attention_dropout",
        "bos_token_id",
        "chunk_size_feed_forward",
        "dtype",
        "eos_token_id",
        "id2label",
        "initializer_range",
        "is_encoder_decoder",
        "label2id",
        "model_type",
        "output_attentions",
        "output_hidden_states",
        "pad_token_id",
        "problem_type",
        "return_dict",
        "tokenizer_class",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    }
)


RESIDUAL_LAYOUTS = ("sequential", "parallel", "parallel_shared_norm")

# The attention softmax: "standard", or one with an extra sink term (see `ModelConfig`).
SOFTMAX_VARIANTS = ("standard", "zero_sink", "sink_logit")


# Keys a RoPE mapping (`rope_parameters`, or the older `rope_scaling`) may hold for each rope type
# streamjax computes, besides `rope_type` (or `type`), `rope_theta` and `partial_rotary_factor`.
ROPE_TYPE_KEYS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
}


# A layer's attention: over the whole cache ("full_attention"), or over its `sliding_window` most
# recent keys ("sliding_attention"); Hugging Face's names.
LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedConfigError(ValueError):
    """A Hugging Face config asks for something this implementation does not compute."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only model (static, hashable).

    `position` is how attention sees positions: "rope" rotates queries and keys, "alibi" adds a
    linear distance bias. Either way positions are the cache-relative ones of `streamjax.model.cache`.

    Fields used by the LayerNorm families (MPT, GPT-NeoX, Falcon; Llama ignores them):
    `alibi_slopes` per-head slopes [N] multiplying the query-key distance in the scaled logits
    (None: the standard slopes of `attention.alibi_slopes`); `attention_scale` the logit scale (None:
    1/sqrt(head_dim)); `clip_qkv` clamps queries, keys and values to [-c, c]; `hidden_act` the MLP
    activation (`families.blocks.ACTIVATIONS`); `residual_layout` is "sequential" (x + attn, then + mlp),
    "parallel" (x + attn(norm_a(x)) + mlp(norm_m(x))) or "parallel_shared_norm" (both read one norm).

    `softmax` (every family) is the attention softmax: "standard"; "zero_sink", softmax-off-by-one (one
    more logit fixed at 0, with a zero value and no position bias, in every softmax); or "sink_logit",
    one learned logit per query head (param `sink_logit` [N] per layer, as gpt-oss's `sinks`) added
    unscaled to each head's softmax, with no value, position bias or mask. The sink takes a share of
    each softmax, so the weights over the real keys sum to less than 1.

    Attention options of the RMSNorm families: `attention_bias` gives the q, k, v and output
    projections biases; `qkv_bias` gives q, k and v theirs but the output projection none (Qwen2);
    `qk_norm` RMS-normalises each query and key head over H with its own weight (params `q_norm`,
    `k_norm` [H], eps `norm_eps`) before RoPE, so the cache holds normed keys (Qwen3).

    Layer types (Gemma 2/3, sliding-window Qwen2/Qwen3/Mistral): `layer_types` names each layer's
    attention, "full_attention" or "sliding_attention" (None: every layer full); a sliding layer lets a
    token see the `sliding_window` most recent keys, itself included (Hugging Face's `sliding_window`),
    and rotates with `sliding_rope_theta` / `sliding_rope_scaling` where those are set (Gemma 3), else with
    the full layers' RoPE. How each layer type is cached is the cache's layout (`cache.CacheLayout`).

    Gemma options: `embedding_multiplier` scales the embedded tokens (Gemma: sqrt(D)); `attn_logit_softcap`
    c caps every attention score to c * tanh(score / c) before masking, `final_logit_softcap` the logits.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    tie_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False
    mlp_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rotary_dim: int | None = None
    alibi_slopes: tuple[float, ...] | None = None
    attention_scale: float | None = None
    clip_qkv: float | None = None
    hidden_act: str = "silu"
    residual_layout: str = "sequential"
    softmax: str = "standard"
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: tuple[tuple[str, Any], ...] | None = None
    embedding_multiplier: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.position not in ("rope", "alibi"):
            raise UnsupportedConfigError(f"unknown position scheme {self.position!r}: use 'rope' or 'alibi'")
        if self.alibi_slopes is not None and len(self.alibi_slopes) != self.num_heads:
            raise UnsupportedConfigError(f"{len(self.alibi_slopes)} alibi_slopes given for {self.num_heads} heads")
        if self.residual_layout not in RESIDUAL_LAYOUTS:
            raise UnsupportedConfigError(
                f"unknown residual_layout {self.residual_layout!r}: use one of {RESIDUAL_LAYOUTS}"
            )
        if self.softmax not in SOFTMAX_VARIANTS:
            raise UnsupportedConfigError(f"unknown softmax {self.softmax!r}: use one of {SOFTMAX_VARIANTS}")
        self._check_layer_types()

    def _check_layer_types(self) -> None:
        if self.layer_types is None:
            return
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedConfigError(f"unknown layer types {unknown}: every layer is one of {LAYER_TYPES}")
        if len(self.layer_types) != self.num_layers:
            raise UnsupportedConfigError(f"{len(self.layer_types)} layer_types given for {self.num_layers} layers")
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise UnsupportedConfigError(
                f"sliding_attention layers need a sliding_window >= 1 (keys seen, itself included), "
                f"got {self.sliding_window!r}"
            )

    @property
    def layer_type_of(self) -> tuple[str, ...]:
        """Each layer's attention type ("full_attention" for every layer without `layer_types`)."""
        return self.layer_types or ("full_attention",) * self.num_layers

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())


def freeze_mapping(mapping: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    """Sorted items of a mapping, so that a config holding it stays hashable."""
    if mapping is None:
        return None
    return tuple(sorted((key, value) for key, value in mapping.items()))


def check_known_fields(hf_config: Mapping[str, Any], handled: Iterable[str], family: str) -> None:
    """Raise if `hf_config` has a field that is neither handled by `family` nor plain metadata."""
    unknown = sorted(set(hf_config) - set(handled) - HF_METADATA_FIELDS)
    if unknown:
        raise UnsupportedConfigError(
            f"{family} config has fields streamjax does not handle: {', '.join(unknown)}. "
            "Remove them if they are metadata, or add support for them in the model file."
        )


def require(condition: bool, message: str) -> None:
    """Raise `UnsupportedConfigError(message)` unless `condition` holds."""
    if not condition:
        raise UnsupportedConfigError(message)


@dataclasses.dataclass(frozen=True)
class RopeSettings:
    """RoPE of a Hugging Face config: base `theta`, `scaling` (frozen items with `rope_type`; None for
    the default) and the share of each head that rotates."""

    theta: float
    scaling: tuple[tuple[str, Any], ...] | None
    partial_rotary_factor: float


def rope_from_hf(
    hf: Mapping[str, Any],
    family: str,
    rope_types: Iterable[str],
    theta_keys: tuple[str, ...] = ("rope_theta",),
    partial_key: str | None = None,
    partial_default: float = 1.0,
) -> RopeSettings:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_scaling` and the top-level keys.

    `theta_keys` and `partial_key` are the top-level fields older configs keep them in. Refuses a rope
    type outside `rope_types`, and any key of the mapping that type does not define (or one it lacks).
    """
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.pop("rope_type", None)
    legacy_kind = rope.pop("type", None)
    kind = kind or legacy_kind or "default"
    require(kind in rope_types, f"{family} rope type {kind!r} is not one of {tuple(rope_types)}")
    theta = rope.pop("rope_theta", None)
    theta = next((hf[key] for key in theta_keys if hf.get(key) is not None), 10000.0) if theta is None else theta
    partial = rope.pop("partial_rotary_factor", None)
    partial = (hf.get(partial_key) if partial_key else None) if partial is None else partial
    unknown, missing = sorted(set(rope) - ROPE_TYPE_KEYS[kind]), sorted(ROPE_TYPE_KEYS[kind] - set(rope))
    require(not unknown, f"{family} rope {kind!r} has fields streamjax does not handle: {', '.join(unknown)}")
    require(not missing, f"{family} rope {kind!r} lacks the fields {', '.join(missing)}")
    scaling = None if kind == "default" else freeze_mapping({"rope_type": kind, **rope})
    return RopeSettings(float(theta), scaling, float(partial_default if partial is None else partial))


# The fields with which a Qwen2 or Qwen3 config limits layers to a sliding window; Mistral has only
# `sliding_window`, which then applies to every layer.
SLIDING_WINDOW_FIELDS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})


def sliding_layers(hf: Mapping[str, Any], family: str, defaults: Mapping[str, Any] | None = None) -> list[int]:
    """The layers that a Hugging Face config limits to its `sliding_window`, by transformers' rule.

    Qwen2/Qwen3: only with `use_sliding_window`, the layers whose `layer_types` entry is
    "sliding_attention" (without `layer_types`, those from `max_window_layers` on); Mistral (no such
    fields): every layer, unless `sliding_window` is null. `defaults` are the values of the fields a
    config may omit (its config class's; without them: the window applies, from layer 0 on). A window
    of at least `max_position_embeddings` tokens never limits a position the model was trained on, so
    its layers count as full. Refuses a `layer_types` of the wrong length or with a type other than
    `LAYER_TYPES`.
    """
    hf = {"use_sliding_window": True, "max_window_layers": 0, **(defaults or {}), **hf}
    num_layers, types = hf["num_hidden_layers"], hf.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - set(LAYER_TYPES))
        require(not unknown, f"{family} layer_types has unknown layer types {unknown}; known: {LAYER_TYPES}")
        require(len(types) == num_layers, f"{family} layer_types has {len(types)} entries for {num_layers} layers")
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings")
    if window is None or not hf["use_sliding_window"] or (context is not None and window >= context):
        return []
    if types is None:
        types = ["sliding_attention" if i >= hf["max_window_layers"] else "full_attention" for i in range(num_layers)]
    return [i for i, kind in enumerate(types) if kind == "sliding_attention"]


def sliding_window_options(
    hf: Mapping[str, Any], family: str, defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The `ModelConfig` fields `layer_types` and `sliding_window` of a Qwen2/Qwen3/Mistral config whose
    layers `sliding_layers` (with its `defaults`) limits to a window; none when no layer slides, so such a
    config equals the full-attention one."""
    layers = set(sliding_layers(hf, family, defaults))
    if not layers:
        return {}
    types = tuple("sliding_attention" if i in layers else "full_attention" for i in range(hf["num_hidden_layers"]))
    return {"layer_types": types, "sliding_window": hf["sliding_window"]}
