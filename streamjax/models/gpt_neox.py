"""GPT-NeoX decoder (Pythia, GPT-NeoX-20B: partial rotary, parallel residual, biased LayerNorms) in JAX.

Letters: B streams, T new tokens, V vocab, D model dim, F MLP dim, L layers, N heads, H head dim,
R rotary dims (`rotary_pct` * H; the rest of each head passes through unrotated).

The checkpoint's query_key_value rows are interleaved per head, [N, 3, H] (q, k, v of head 0, then
head 1, ...); they are split into q, k, v params on load. `use_parallel_residual` gives
x + attn(ln_1(x)) + mlp(ln_2(x)), otherwise the sequential pre-norm block. The untied head is
`embed_out` in checkpoints (transformers 5 renames it `lm_head` in memory and back on save).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from streamjax import cache as cache_lib
from streamjax.config import ModelConfig, check_known_fields, freeze_mapping, require
from streamjax.models import common
from streamjax.models.common import ParamSpec, TensorRule

FAMILY = "gpt_neox"
TIED_HEAD = ("lm_head.weight", "gpt_neox.embed_in.weight")  # (head, embedding) when tie_word_embeddings

_HANDLED_FIELDS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout", "classifier_dropout", "max_position_embeddings", "layer_norm_eps", "tie_word_embeddings",
    "use_parallel_residual", "rope_parameters", "rope_scaling", "rope_theta", "rotary_pct", "rotary_emb_base",
    "attention_bias", "is_decoder",
}  # fmt: skip
_ROPE_TYPES = ("default", "linear")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face `GPTNeoXConfig` dict (new `rope_parameters` or old `rotary_pct`)."""
    check_known_fields(hf, _HANDLED_FIELDS, FAMILY)
    act = hf.get("hidden_act", "gelu")
    require(act in common.ACTIVATIONS, f"gpt_neox hidden_act {act!r} is not one of {sorted(common.ACTIVATIONS)}")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = rope.pop("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    require(rope["rope_type"] in _ROPE_TYPES, f"rope type {rope['rope_type']!r} is not one of {_ROPE_TYPES}")
    hidden, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    require(hidden % num_heads == 0, f"gpt_neox hidden_size={hidden} is not a multiple of {num_heads} heads")
    head_dim = hidden // num_heads
    rotary_dim = int(head_dim * partial)
    require(rotary_dim % 2 == 0, f"gpt_neox rotary dims {rotary_dim} (rotary_pct * head_dim) must be even")
    return ModelConfig(
        family=FAMILY,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        attention_bias=hf.get("attention_bias", True),
        mlp_bias=True,
        rope_theta=float(rope_theta),
        rope_scaling=None if rope["rope_type"] == "default" else freeze_mapping(rope),
        rotary_dim=rotary_dim,
        hidden_act=act,
        residual_layout="parallel" if hf.get("use_parallel_residual", True) else "sequential",
    )


def param_specs(config: ModelConfig) -> dict:
    """Shape and logical axes of every parameter (a pytree matching the params)."""
    D, L, V = config.hidden_size, config.num_layers, config.vocab_size
    layers = {
        **common.norm_specs("attn_norm", (D,), ("embed",), bias=True),
        **common.attention_specs(config, config.attention_bias),
        **common.norm_specs("mlp_norm", (D,), ("embed",), bias=True),
        **common.mlp_specs(config, bias=True),
    }
    specs = {"embed": ParamSpec((V, D), ("vocab", "embed")), "layers": common.per_layer(layers, L)}
    specs.update(common.norm_specs("final_norm", (D,), ("embed",), bias=True))
    if not config.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def hf_tensor_rules(config: ModelConfig) -> list[TensorRule]:
    """How each Hugging Face tensor maps onto a param (query_key_value rows are [N, 3, H])."""
    bias, layer = config.attention_bias, "gpt_neox.layers.{i}"
    rules = [
        TensorRule("gpt_neox.embed_in.weight", ("embed",)),
        *common.norm_rules("gpt_neox.final_layer_norm", ("final_norm",), bias=True),
        *common.norm_rules(f"{layer}.input_layernorm", ("layers", "attn_norm"), bias=True),
        *common.qkv_rules(f"{layer}.attention.query_key_value", config, bias),  # rows [N, 3, H]: K = N, G = 1
        *common.output_rules(f"{layer}.attention.dense", config, bias),
        *common.norm_rules(f"{layer}.post_attention_layernorm", ("layers", "mlp_norm"), bias=True),
        *common.linear_rules(f"{layer}.mlp.dense_h_to_4h", "up", bias=True),
        *common.linear_rules(f"{layer}.mlp.dense_4h_to_h", "down", bias=True),
    ]
    if not config.tie_embeddings:
        rules.append(TensorRule("embed_out.weight", ("lm_head",), np.transpose))
    return rules


def forward(
    params: dict, cache: cache_lib.SinkCache, tokens: jax.Array, config: ModelConfig
) -> tuple[jax.Array, cache_lib.SinkCache]:
    """Feed tokens [B, T] to every stream: logits [B, T, V] (float32) and the advanced cache."""
    return common.run_decoder(params, cache, tokens, config, common.layer_norm_decoder_layer)
