"""Llama-family decoder (Llama 1/2/3, SmolLM2) in functional JAX, and the Llama-style config conversion
that the Qwen2, Qwen3 and Mistral families (which use this decoder) share.

Letters: B streams, T new tokens, D model dim, F MLP dim, H head dim.

A pre-norm block with RMSNorm, attention (`attention.self_attention`, with the biases and query/key
norms its `ModelConfig` asks for) and the gated SiLU MLP, whose gate and up projections are one
[D, 2, F] matrix (`gate_up`).

A Llama with a sink softmax (`ModelConfig.softmax`) is saved with `"model_type": "llama_attention_sink"`
(so that transformers refuses it rather than computing a standard softmax) and `"softmax": "zero_sink"`
or `"sink_logit"`; its learned logits are `model.layers.{i}.self_attn.sinks` [N] (gpt-oss's name).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from streamjax.model import params as P
from streamjax.model.attention import LayerCache, LayerOutputs, self_attention
from streamjax.model.cache import ChunkPlan
from streamjax.model.config import SOFTMAX_VARIANTS, ModelConfig, check_known_fields, require, rope_from_hf
from streamjax.model.families.blocks import gated_mlp
from streamjax.model.norms import rms_norm

NAME = "llama"
SINK_MODEL_TYPE = "llama_attention_sink"
HF_MODEL_TYPES = ("llama", SINK_MODEL_TYPE)
TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")

# The fields of a Llama-style Hugging Face config that `llama_style_config` reads.
LLAMA_STYLE_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
})  # fmt: skip
_HANDLED_FIELDS = LLAMA_STYLE_FIELDS | {"attention_bias", "mlp_bias", "pretraining_tp", "softmax"}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `LlamaConfig` dict (old `rope_scaling` or new `rope_parameters`)."""
    check_known_fields(hf, _HANDLED_FIELDS, NAME)
    return llama_style_config(
        hf,
        NAME,
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        softmax=_softmax_from_hf(hf),
    )


def llama_style_config(hf: Mapping[str, Any], family: str, **options: Any) -> ModelConfig:
    """The `family` ModelConfig of a Llama-style Hugging Face config dict (RMSNorm, SiLU-gated MLP, RoPE
    of type default, linear or llama3): its `LLAMA_STYLE_FIELDS`, with `options` (biases, `qk_norm`,
    `softmax`) setting the rest. The caller has refused the fields it does not handle."""
    require(hf.get("hidden_act", "silu") == "silu", f"{family} hidden_act {hf.get('hidden_act')!r} is not supported")
    rope = rope_from_hf(hf, family, ("default", "linear", "llama3"))
    require(rope.partial_rotary_factor == 1.0, f"{family} partial_rotary_factor other than 1 is not supported")
    num_heads = hf["num_attention_heads"]
    return ModelConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=rope.theta,
        rope_scaling=rope.scaling,
        **options,
    )


def _softmax_from_hf(hf: Mapping[str, Any]) -> str:
    """The softmax of a Llama config: "standard" for model_type "llama", its `softmax` field for a sink model."""
    softmax = hf.get("softmax")
    if hf.get("model_type") != SINK_MODEL_TYPE:
        require(
            softmax is None,
            f'llama config sets softmax={softmax!r}: a sink-softmax Llama has "model_type": "{SINK_MODEL_TYPE}" '
            "(which transformers refuses instead of computing a standard softmax); remove the field otherwise",
        )
        return "standard"
    require(
        softmax in SOFTMAX_VARIANTS and softmax != "standard",
        f'model_type "{SINK_MODEL_TYPE}" needs "softmax" set to "zero_sink" or "sink_logit", got {softmax!r} '
        '(a standard Llama is model_type "llama")',
    )
    return softmax


def layer_specs(config: ModelConfig) -> dict:
    return {
        **P.norm_specs("attn_norm", config, bias=False),
        **P.attention_specs(config, config.attention_bias or config.qkv_bias, output_bias=config.attention_bias),
        **P.norm_specs("mlp_norm", config, bias=False),
        **P.gated_mlp_specs(config, config.mlp_bias),
    }


def final_norm_specs(config: ModelConfig) -> dict:
    return P.norm_specs("final_norm", config, bias=False)


def hf_tensor_rules(config: ModelConfig) -> list[P.TensorRule]:
    """How each Hugging Face tensor maps onto a param (HF linear weights are [out, in])."""
    layer = "model.layers.{i}"
    rules = [
        *P.head_rules("model.embed_tokens.weight", "lm_head.weight", config),
        P.TensorRule("model.norm.weight", ("final_norm",)),
        P.TensorRule(f"{layer}.input_layernorm.weight", ("layers", "attn_norm")),
        P.TensorRule(f"{layer}.post_attention_layernorm.weight", ("layers", "mlp_norm")),
        *P.separate_qkv_rules(
            tuple(f"{layer}.self_attn.{x}_proj" for x in "qkv"), config, config.attention_bias or config.qkv_bias
        ),
        *P.output_rules(f"{layer}.self_attn.o_proj", config, config.attention_bias),
        *P.gated_mlp_rules(f"{layer}.mlp", config.mlp_bias),
    ]
    if config.softmax == "sink_logit":
        rules.append(P.TensorRule(f"{layer}.self_attn.sinks", ("layers", "sink_logit")))
    if config.qk_norm:
        rules += [P.TensorRule(f"{layer}.self_attn.{name}.weight", ("layers", name)) for name in ("q_norm", "k_norm")]
    return rules


def decoder_layer(
    p: dict, x: jax.Array, layer_cache: LayerCache | None, plan: ChunkPlan, config: ModelConfig
) -> tuple[jax.Array, LayerOutputs]:
    attended, outputs = self_attention(p, rms_norm(x, p["attn_norm"], config.norm_eps), layer_cache, plan, config)
    x = x + attended
    return x + gated_mlp(p, rms_norm(x, p["mlp_norm"], config.norm_eps), config), outputs


def final_norm(params: dict, x: jax.Array, config: ModelConfig) -> jax.Array:
    return rms_norm(x, params["final_norm"], config.norm_eps)
