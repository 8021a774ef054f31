"""Gemma 2 family, and the Gemma decoder that Gemma 3 (`families.gemma3`) shares, from a Hugging Face
`Gemma2Config`.

Letters: B streams, T new tokens, D model dim, F MLP dim, H head dim.

A Gemma layer has four RMSNorms: x + post_attn_norm(attention(attn_norm(x))), then
+ post_mlp_norm(GeGLU(mlp_norm(.))), the MLP gated by the config's `hidden_activation` (tanh GELU).
The embedding is scaled by sqrt(D) (`ModelConfig.embedding_multiplier`), attention scores by
query_pre_attn_scalar ** -0.5 (`ModelConfig.attention_scale`); Gemma 2 soft-caps attention scores and
logits (`attn_logit_softcapping`, `final_logit_softcapping`) and alternates sliding-window and full
layers (layer 0 slides), all layers with one RoPE.

Gemma's RMSNorm multiplies the normed x by (1 + w), in float32. The +1 is folded into every norm
weight when a checkpoint is loaded (`hf_tensor_rules`, `fold_norm`), so the params hold 1 + w and the
shared `norms.rms_norm` applies (to the query and key norms of Gemma 3 as well). The fold is done in
float32, where it is the very number transformers multiplies by, 1.0 + weight.float(); params loaded
in bfloat16 hold 1 + w rounded to bfloat16 (transformers keeps it in float32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from streamjax.model import params as P
from streamjax.model.attention import LayerCache, LayerOutputs, self_attention
from streamjax.model.cache import ChunkPlan
from streamjax.model.config import ModelConfig, RopeSettings, check_known_fields, require, rope_from_hf
from streamjax.model.families import llama
from streamjax.model.families.blocks import ACTIVATIONS, gated_mlp
from streamjax.model.norms import rms_norm

NAME = "gemma2"
HF_MODEL_TYPES = ("gemma2",)
TIED_HEAD = llama.TIED_HEAD

# The RoPE types Gemma configs may ask for that `positions.rope_frequencies` computes.
ROPE_TYPES = ("default", "linear", "llama3")

# The fields of a Gemma 2 or Gemma 3 config that `gemma_config` reads. `cache_implementation` ("hybrid")
# only tells transformers' `generate` which cache to build; `hidden_act` is an old alias that transformers
# no longer reads (`gemma_config` requires it to agree with `hidden_activation`).
GEMMA_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "attention_bias", "query_pre_attn_scalar", "sliding_window",
    "layer_types", "attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention",
    "cache_implementation",
})  # fmt: skip
_HANDLED_FIELDS = GEMMA_FIELDS | {"rope_theta", "rope_scaling", "rope_parameters"}

# transformers' `Gemma2Config` defaults for the fields a config.json may omit.
CONFIG_DEFAULTS = {
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
}  # fmt: skip


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `Gemma2Config` dict (without `layer_types`: every even layer slides)."""
    check_known_fields(hf, _HANDLED_FIELDS, NAME)
    hf = {**CONFIG_DEFAULTS, **hf}
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hf["num_hidden_layers"])]
    return gemma_config(
        hf,
        NAME,
        hf.get("layer_types") or alternating,
        rope_from_hf(hf, NAME, ROPE_TYPES),
        attn_logit_softcap=hf["attn_logit_softcapping"],
        final_logit_softcap=hf["final_logit_softcapping"],
    )


def gemma_config(
    hf: Mapping[str, Any], family: str, layer_types: Sequence[str], rope: RopeSettings, **options: Any
) -> ModelConfig:
    """The `family` ModelConfig of a Gemma config dict (with its family's defaults filled in): the
    `GEMMA_FIELDS` but the soft-caps, with `layer_types`, the full layers' `rope` and `options` (soft-caps,
    `qk_norm`, the sliding layers' RoPE) setting the rest. The caller has refused the fields it does not
    handle; `ModelConfig` refuses unknown layer types and a `layer_types` of the wrong length."""
    activation = hf["hidden_activation"]
    require(activation in ACTIVATIONS, f"{family} hidden_activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    require(
        hf.get("hidden_act", activation) == activation,
        f"{family} config has hidden_act={hf.get('hidden_act')!r} but hidden_activation={activation!r}; "
        "transformers computes hidden_activation: remove hidden_act or make them agree",
    )
    require(
        not hf.get("use_bidirectional_attention"),
        f"{family} use_bidirectional_attention=True (every token sees the tokens after it, an encoder) is not "
        "supported: streamjax computes causal attention; set it to false",
    )
    require(rope.partial_rotary_factor == 1.0, f"{family} partial_rotary_factor other than 1 is not supported")
    num_heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    return ModelConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf["head_dim"],
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf["rms_norm_eps"],
        tie_embeddings=hf["tie_word_embeddings"],
        max_position_embeddings=hf["max_position_embeddings"],
        attention_bias=hf["attention_bias"],
        rope_theta=rope.theta,
        rope_scaling=rope.scaling,
        attention_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
        hidden_act=activation,
        layer_types=tuple(layer_types),
        sliding_window=hf["sliding_window"],
        embedding_multiplier=float(hidden) ** 0.5,
        **options,
    )


def layer_specs(config: ModelConfig) -> dict:
    """A Gemma layer: four norms [D], attention (q/k norms [H] with `qk_norm`), the gated MLP."""
    norms = ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm")
    return {
        **{name: spec for norm in norms for name, spec in P.norm_specs(norm, config, bias=False).items()},
        **P.attention_specs(config, config.attention_bias),
        **P.gated_mlp_specs(config, bias=False),
    }


def final_norm_specs(config: ModelConfig) -> dict:
    return P.norm_specs("final_norm", config, bias=False)


def fold_norm(weight: np.ndarray) -> np.ndarray:
    """A Gemma RMSNorm weight w (float32) as the factor 1 + w that `norms.rms_norm` multiplies by."""
    return weight + np.float32(1.0)


def hf_tensor_rules(config: ModelConfig) -> list[P.TensorRule]:
    """How each Hugging Face tensor maps onto a param (HF linear weights are [out, in]; every norm
    weight w becomes 1 + w, `fold_norm`)."""
    layer = "model.layers.{i}"
    norms = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attn_norm",
        "pre_feedforward_layernorm": "mlp_norm",
        "post_feedforward_layernorm": "post_mlp_norm",
    }
    rules = [
        *P.head_rules("model.embed_tokens.weight", "lm_head.weight", config),
        P.TensorRule("model.norm.weight", ("final_norm",), fold_norm),
        *(P.TensorRule(f"{layer}.{hf}.weight", ("layers", name), fold_norm) for hf, name in norms.items()),
        *P.separate_qkv_rules(tuple(f"{layer}.self_attn.{x}_proj" for x in "qkv"), config, config.attention_bias),
        *P.output_rules(f"{layer}.self_attn.o_proj", config, config.attention_bias),
        *P.gated_mlp_rules(f"{layer}.mlp", bias=False),
    ]
    if config.qk_norm:
        rules += [P.TensorRule(f"{layer}.self_attn.{n}.weight", ("layers", n), fold_norm) for n in ("q_norm", "k_norm")]
    return rules


def decoder_layer(
    p: dict, x: jax.Array, layer_cache: LayerCache | None, plan: ChunkPlan, config: ModelConfig
) -> tuple[jax.Array, LayerOutputs]:
    """One Gemma layer on x [B, T, D] (see the module docstring); `plan` is that of the layer's type."""
    eps = config.norm_eps
    attended, outputs = self_attention(p, rms_norm(x, p["attn_norm"], eps), layer_cache, plan, config)
    x = x + rms_norm(attended, p["post_attn_norm"], eps)
    return x + rms_norm(gated_mlp(p, rms_norm(x, p["mlp_norm"], eps), config), p["post_mlp_norm"], eps), outputs


def final_norm(params: dict, x: jax.Array, config: ModelConfig) -> jax.Array:
    return rms_norm(x, params["final_norm"], config.norm_eps)
