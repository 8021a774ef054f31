"""Gemma 2 and Gemma 3: logits against transformers (a plain causal pass, the chunk route and the token route),
the configs and params they convert to, Gemma's (1 + w) norm weights, loading, and the configs refused.

Tiny random models of `support.family_models.GEMMA_VARIANTS` (2, 3 or 4 layers, hidden 48, 6 query heads with 2, 3
or 1 kv heads, head dim 8 or 16, every weight ~ N(0, 0.2), Gemma norm weights w ~ N(0, 0.2) so that the 1 + w
matters) in float32 with transformers' eager attention.

Variants with a sliding window of 8 inside the tests' 40 tokens, and with a RoPE base per layer type, exercise
the hybrid cache: each layer type is planned with its own window and RoPE (`cache.plan_layers`).
"""

import jax
import numpy as np
import pytest

import streamjax
from streamjax.model import families
from streamjax.model.config import UnsupportedConfigError
from support.family_models import GEMMA_VARIANTS, TOKENS, converted, expected_logits, hf_model

# About 3x the largest difference measured against transformers 5.25 over every variant and route (no cache,
# chunks, token by token, windows of 8 and a RoPE base per layer type included): 4.7e-6 (logits up to 5.5).
PARITY = 1.5e-5

VARIANTS = sorted(GEMMA_VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant):
    """Without a cache, on the chunk route (chunks of 20) and token by token through a 4 + 60 cache."""
    config, params = converted(variant)
    expected = expected_logits(variant)
    assert np.abs(expected).max() > 1.0  # large enough that a wrong layout would show

    causal = streamjax.forward(params, None, TOKENS, config).logits
    np.testing.assert_allclose(np.asarray(causal), expected, atol=PARITY, rtol=0)
    cache = streamjax.init_cache(config, TOKENS.shape[0], num_sinks=4, window=60)
    chunked, _ = streamjax.prefill(params, cache, TOKENS, config, chunk_size=20)
    np.testing.assert_allclose(np.asarray(chunked), expected, atol=PARITY, rtol=0)
    cache = streamjax.init_cache(config, TOKENS.shape[0], num_sinks=4, window=60)
    one_by_one, _ = streamjax.feed_tokens(params, cache, TOKENS, config)
    np.testing.assert_allclose(np.asarray(one_by_one), expected, atol=PARITY, rtol=0)


def test_configs_record_each_variant():
    expected = {  # variant -> (layer types ("s"/"f"), window, attention scale, softcaps, full/sliding RoPE base)
        "gemma2_gqa_tied_wide_window": ("sf", 64, 12**-0.5, (2.0, 3.0), (500.0, None)),
        "gemma2_mqa_untied_bias_window_8": ("sfs", 8, 20**-0.5, (2.5, 4.0), (10000.0, None)),
        "gemma3_gqa_tied_one_rope_wide_window": ("ssfs", 64, 6**-0.5, (None, 3.0), (300.0, 300.0)),
        "gemma3_gqa_untied_rope_per_type_wide_window": ("ssfs", 64, 20**-0.5, (None, None), (10000.0, 50.0)),
        "gemma3_mqa_tied_bias_window_8": ("ssfs", 8, 10**-0.5, (None, 3.0), (10000.0, 50.0)),
    }
    assert sorted(expected) == sorted(GEMMA_VARIANTS)
    for variant, (types, window, scale, softcaps, bases) in expected.items():
        config, _ = converted(variant)
        assert config.family == GEMMA_VARIANTS[variant][0]
        assert config.layer_types == tuple({"s": "sliding_attention", "f": "full_attention"}[t] for t in types)
        assert (config.sliding_window, config.attention_scale) == (window, scale)
        assert (config.attn_logit_softcap, config.final_logit_softcap) == softcaps
        assert (config.rope_theta, config.sliding_rope_theta) == bases
        assert (config.embedding_multiplier, config.hidden_act) == (48**0.5, "gelu_pytorch_tanh")
        assert config.qk_norm == (config.family == "gemma3")
    per_type = converted("gemma3_mqa_tied_bias_window_8")[0]
    assert (per_type.rope_scaling_dict, per_type.sliding_rope_scaling) == ({"rope_type": "linear", "factor": 2.0}, None)


@pytest.mark.parametrize("variant", ["gemma2_mqa_untied_bias_window_8", "gemma3_mqa_tied_bias_window_8"])
def test_params_hold_every_tensor_with_norm_weights_one_plus_w(variant):
    """Four norms per layer (and Gemma 3's q/k norms) hold 1 + w, computed in float32 exactly as transformers'
    1.0 + weight.float(); the projections carry the checkpoint's biases."""
    config, params = converted(variant)
    model = hf_model(variant)
    norms = {
        "attn_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
        **({"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"} if config.qk_norm else {}),
    }
    expected_names = {"qkv", "qkv_bias", "o", "o_bias", "gate_up", "down", *norms}
    for layer, hf_layer in zip(params["layers"], model.model.layers, strict=True):
        assert set(layer) == expected_names
        for name, hf_name in norms.items():
            weight = hf_layer.get_submodule(hf_name).weight
            assert weight.abs().max() > 0.1  # w is far from 0, so omitting the 1 + w would show
            np.testing.assert_array_equal(np.asarray(layer[name]), (1.0 + weight.float()).detach().numpy())
    final = (1.0 + model.model.norm.weight.float()).detach().numpy()
    np.testing.assert_array_equal(np.asarray(params["final_norm"]), final)
    assert ("lm_head" in params) == (not config.tie_embeddings)
    o_bias = model.model.layers[0].self_attn.o_proj.bias.detach().numpy()
    np.testing.assert_array_equal(np.asarray(params["layers"][0]["o_bias"]), o_bias)


@pytest.mark.parametrize("variant", ["gemma2_gqa_tied_wide_window", "gemma3_gqa_untied_rope_per_type_wide_window"])
def test_save_pretrained_then_load_hf_directory(variant, tmp_path):
    hf_model(variant).save_pretrained(tmp_path, safe_serialization=True)
    config, params = streamjax.load_hf_directory(tmp_path)
    expected_config, expected_params = converted(variant)
    assert config == expected_config
    assert jax.tree.structure(params) == jax.tree.structure(expected_params)
    for (path, leaf), expected in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected_params)):
        np.testing.assert_array_equal(leaf, expected, err_msg=jax.tree_util.keystr(path))


def _valid(variant: str) -> dict:
    return hf_model(variant).config.to_dict()


def _with(config: dict, **changes) -> dict:
    return {**config, **changes}


def _without(config: dict, *names: str) -> dict:
    return {key: value for key, value in config.items() if key not in names}


def _transformers_config(config: dict):
    """transformers' own config class built from a config dict, as `from_pretrained` builds it from config.json."""
    import transformers

    cls = {"gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig}[config["model_type"]]
    return cls.from_dict(config)


# Config dicts as older config.json files on the hub write them: no layer_types, the RoPE at the top level.
OLDER_CONFIGS = {
    "gemma2_alternating": lambda: _without(_valid("gemma2_gqa_tied_wide_window"), "layer_types"),
    "gemma2_five_layers_rope_theta": lambda: _with(
        _without(_valid("gemma2_gqa_tied_wide_window"), "layer_types", "rope_parameters"),
        num_hidden_layers=5,
        rope_theta=700.0,
        hidden_act="gelu_pytorch_tanh",
        cache_implementation="hybrid",
    ),
    "gemma3_pattern": lambda: _without(_valid("gemma3_mqa_tied_bias_window_8"), "layer_types"),
    "gemma3_default_pattern_top_level_rope": lambda: _with(
        _without(_valid("gemma3_gqa_tied_one_rope_wide_window"), "layer_types", "rope_parameters"),
        num_hidden_layers=7,
        sliding_window_pattern=None,
        rope_theta=20000.0,
        rope_local_base_freq=30.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    ),
}


@pytest.mark.parametrize("name", sorted(OLDER_CONFIGS))
def test_older_configs_convert_as_transformers_reads_them(name):
    """Layer types and each type's RoPE are what transformers derives from the same dict."""
    hf = OLDER_CONFIGS[name]()
    if hf.get("sliding_window_pattern", 0) is None:
        del hf["sliding_window_pattern"]  # absent: transformers' default pattern of 6
    config, reference = families.config_from_hf(hf), _transformers_config(hf)
    assert config.layer_types == tuple(reference.layer_types)
    assert "full_attention" in config.layer_types and "sliding_attention" in config.layer_types
    rope = reference.rope_parameters
    if config.family == "gemma2":
        assert (config.rope_theta, config.sliding_rope_theta) == (rope["rope_theta"], None)
        return
    full, sliding = rope["full_attention"], rope["sliding_attention"]
    assert (config.rope_theta, config.sliding_rope_theta) == (full["rope_theta"], sliding["rope_theta"])
    full_scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    assert config.rope_scaling_dict == ({} if full_scaling == {"rope_type": "default"} else full_scaling)


REFUSED = {  # name -> (variant, edit of its valid config dict, message pattern)
    "gemma3_attention_softcap": (
        "gemma3_gqa_tied_one_rope_wide_window",
        lambda c: _with(c, attn_logit_softcapping=50.0),
        r"gemma3 attn_logit_softcapping=50.0: transformers' Gemma 3 does not apply it .* set it to null",
    ),
    "gemma3_bidirectional": (
        "gemma3_gqa_tied_one_rope_wide_window",
        lambda c: _with(c, use_bidirectional_attention=True),
        "gemma3 use_bidirectional_attention=True .* streamjax computes causal attention",
    ),
    "gemma2_bidirectional": (
        "gemma2_gqa_tied_wide_window",
        lambda c: _with(c, use_bidirectional_attention=True),
        "gemma2 use_bidirectional_attention=True",
    ),
    "gemma2_unknown_field": (
        "gemma2_gqa_tied_wide_window",
        lambda c: _with(c, rope_local_base_freq=10.0),
        "gemma2 config has fields streamjax does not handle: rope_local_base_freq",
    ),
    "gemma3_unknown_field": (
        "gemma3_gqa_tied_one_rope_wide_window",
        lambda c: _with(c, mlp_bias=True),
        "gemma3 config has fields streamjax does not handle: mlp_bias",
    ),
    "gemma3_unknown_layer_type": (
        "gemma3_gqa_tied_one_rope_wide_window",
        lambda c: _with(c, layer_types=["sliding_attention", "chunked_attention", "full_attention", "full_attention"]),
        r"unknown layer types \['chunked_attention'\]",
    ),
    "gemma2_layer_types_too_short": (
        "gemma2_gqa_tied_wide_window",
        lambda c: _with(c, layer_types=["sliding_attention"]),
        "1 layer_types given for 2 layers",
    ),
    "gemma3_no_window_for_sliding_layers": (
        "gemma3_gqa_tied_one_rope_wide_window",
        lambda c: _with(c, sliding_window=None),
        "sliding_attention layers need a sliding_window >= 1",
    ),
    "gemma3_flat_rope_parameters": (
        "gemma3_gqa_tied_one_rope_wide_window",
        lambda c: _with(c, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        r"gemma3 rope_parameters has keys \['rope_theta', 'rope_type'\]: it must map each layer type",
    ),
    "gemma3_yarn_on_sliding_layers": (
        "gemma3_gqa_tied_one_rope_wide_window",
        lambda c: _with(c, rope_parameters={"sliding_attention": {"rope_type": "yarn", "factor": 2.0}}),
        "gemma3 sliding_attention rope type 'yarn'",
    ),
    "gemma3_rope_scaling_old_type_key": (
        "gemma3_gqa_tied_one_rope_wide_window",
        lambda c: _with(c, rope_scaling={"type": "linear", "factor": 4.0}),
        "gemma3 rope_scaling names its type with the old key 'type', which transformers 5 ignores",
    ),
    "gemma2_activation": (
        "gemma2_gqa_tied_wide_window",
        lambda c: _with(c, hidden_activation="swish"),
        "gemma2 hidden_activation 'swish' is not one of",
    ),
    "gemma2_hidden_act_disagrees": (
        "gemma2_gqa_tied_wide_window",
        lambda c: _with(c, hidden_act="gelu"),
        "gemma2 config has hidden_act='gelu' but hidden_activation='gelu_pytorch_tanh'",
    ),
    "gemma3_multimodal_config": (  # Gemma3Config (image and text) nests the text model's config
        "gemma3_gqa_tied_one_rope_wide_window",
        lambda c: {"model_type": "gemma3", "text_config": c},
        r"model_type 'gemma3' is not supported; streamjax handles .*'gemma3_text'",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_config_raises(case):
    variant, edit, pattern = REFUSED[case]
    families.config_from_hf(_valid(variant))  # the unedited config is accepted
    with pytest.raises(UnsupportedConfigError, match=pattern):
        families.config_from_hf(edit(_valid(variant)))
