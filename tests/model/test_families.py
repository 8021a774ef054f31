"""MPT, GPT-NeoX and Falcon: logits against transformers, streaming against numpy references, loading.

Tiny random models (2 layers, hidden 48-64, every weight ~ N(0, 0.2), LayerNorm weights 1 + N(0, 0.2))
in float32, one per layout option each family has.
"""

import math

import jax
import numpy as np
import pytest

import streamjax
from streamjax.files.weights import convert_tensors
from streamjax.model import families
from streamjax.model.config import UnsupportedConfigError
from support.family_models import (
    HF_CLASSES,
    STREAM_TOKENS,
    TOKENS,
    VARIANTS,
    VOCAB,
    checkpoint_tensors,
    converted,
    expected_logits,
    hf_model,
    stream_reference,
)

# About 3x the largest differences measured: logits against transformers 7.6e-6, against the numpy
# references 4.9e-6 (the logits themselves reach 8).
PARITY, REFERENCE = 2.3e-5, 1.5e-5


def _prefill_logits(config, params, tokens=TOKENS, num_sinks=4, window=60, chunk_size=20):
    cache = streamjax.init_cache(config, tokens.shape[0], num_sinks, window)
    return np.asarray(streamjax.prefill(params, cache, tokens, config, chunk_size=chunk_size)[0])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
    config, params = converted(variant)
    expected = expected_logits(variant)
    assert np.abs(expected).max() > 1.0  # large enough that a wrong layout would show

    np.testing.assert_allclose(_prefill_logits(config, params), expected, atol=PARITY, rtol=0)
    cache = streamjax.init_cache(config, 2, num_sinks=4, window=60)
    one_by_one, _ = streamjax.feed_tokens(params, cache, TOKENS, config)
    np.testing.assert_allclose(one_by_one, expected, atol=PARITY, rtol=0)


STREAM_VARIANTS = [
    "mpt_clip_qkv", "neox_quarter_rotary_parallel", "falcon_new_arch_gqa_rope", "falcon_rw_alibi_sequential_bias",
]  # fmt: skip


@pytest.mark.parametrize("variant", STREAM_VARIANTS)
def test_reference_is_transformers_while_nothing_is_evicted(variant):
    reference = stream_reference(variant, TOKENS[0], num_sinks=4, window=60)
    np.testing.assert_allclose(reference, expected_logits(variant)[0], atol=REFERENCE, rtol=0)


@pytest.mark.parametrize("num_sinks", [0, 1, 4])
@pytest.mark.parametrize("variant", STREAM_VARIANTS)
def test_streaming_past_the_cache_matches_reference(variant, num_sinks):
    config, params = converted(variant)
    window = 7
    reference = stream_reference(variant, STREAM_TOKENS[0], num_sinks, window)
    chunked = _prefill_logits(config, params, STREAM_TOKENS, num_sinks, window, chunk_size=15)
    np.testing.assert_allclose(chunked[0], reference, atol=REFERENCE, rtol=0)
    if num_sinks == 1:
        cache = streamjax.init_cache(config, 1, num_sinks, window)
        one_by_one, _ = streamjax.feed_tokens(params, cache, STREAM_TOKENS, config)
        np.testing.assert_allclose(one_by_one[0], reference, atol=REFERENCE, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_pretrained_then_load_hf_directory(variant, tmp_path):
    hf_model(variant).save_pretrained(tmp_path, safe_serialization=True)
    config, params = streamjax.load_hf_directory(tmp_path)
    expected_config, expected_params = converted(variant)
    assert config == expected_config
    assert jax.tree.structure(params) == jax.tree.structure(expected_params)
    for (path, leaf), expected in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected_params)):
        np.testing.assert_array_equal(leaf, expected, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(_prefill_logits(config, params), expected_logits(variant), atol=PARITY, rtol=0)


def test_gpt_neox_checkpoint_buffers_are_ignored():
    config, params = converted("neox_quarter_rotary_parallel")
    tensors = checkpoint_tensors(hf_model("neox_quarter_rotary_parallel"))
    tensors["gpt_neox.layers.0.attention.bias"] = np.tril(np.ones((1, 1, 8, 8), bool))  # old Pythia files
    tensors["gpt_neox.layers.0.attention.masked_bias"] = np.array(-1e9, np.float32)
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    reloaded = convert_tensors(tensors, config)
    for reloaded_layer, layer in zip(reloaded["layers"], params["layers"], strict=True):
        np.testing.assert_array_equal(reloaded_layer["qkv"], layer["qkv"])


def test_mpt_slopes_match_transformers():
    from transformers import MptConfig
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for num_heads in range(1, 21):
        for bias_max in (8, 16):
            hf = MptConfig(d_model=4 * num_heads, n_heads=num_heads, attn_config={"alibi_bias_max": bias_max})
            alibi = build_mpt_alibi_tensor(num_heads, 2, alibi_bias_max=bias_max)[:, 0].numpy()
            slopes = families.config_from_hf(hf.to_dict()).alibi_slopes
            np.testing.assert_array_equal(np.float32(slopes), np.float32(alibi[:, 1] - alibi[:, 0]))


def test_falcon_slopes_are_transformers_bf16_slopes_over_sqrt_head_dim():
    import torch
    from transformers import FalconConfig
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    for num_heads in range(1, 41):
        hf = FalconConfig(hidden_size=16 * num_heads, num_attention_heads=num_heads, alibi=True)
        hf_slopes = build_alibi_tensor(torch.ones((1, 2), dtype=torch.long), num_heads, torch.float32)[:, 0, 1]
        slopes = np.asarray(families.config_from_hf(hf.to_dict()).alibi_slopes)
        np.testing.assert_array_equal(np.float32(slopes) * np.float32(math.sqrt(16)), hf_slopes.numpy())


def _hf_config_dict(family: str, **settings) -> dict:
    import transformers

    config_class, _, base = HF_CLASSES[family]
    return getattr(transformers, config_class)(vocab_size=VOCAB, **base, **settings).to_dict()


def _with(config: dict, **changes) -> dict:
    return {**config, **changes}


def _with_attn(config: dict, **changes) -> dict:
    return {**config, "attn_config": {**config["attn_config"], **changes}}


UNSUPPORTED = {  # name -> (family, edit of a valid config dict, message fragment)
    "mpt_qk_ln": ("mpt", lambda c: _with_attn(c, qk_ln=True), "qk_ln"),
    "mpt_prefix_lm": ("mpt", lambda c: _with_attn(c, prefix_lm=True), "prefix_lm"),
    "mpt_learned_positions": ("mpt", lambda c: _with_attn(c, alibi=False), "ALiBi"),
    "mpt_multiquery": ("mpt", lambda c: _with_attn(c, attn_type="multiquery_attention"), "multihead"),
    "mpt_logit_scale": ("mpt", lambda c: _with(c, logit_scale=2.0), "logit_scale"),
    "mpt_rms_norm": ("mpt", lambda c: _with(c, norm_type="rmsnorm"), "norm_type"),
    "mpt_unknown_attn_field": ("mpt", lambda c: _with_attn(c, rope=True), "rope"),
    "mpt_unknown_field": ("mpt", lambda c: _with(c, ffn_config={"ffn_type": "te_ln_mlp"}), "ffn_config"),
    "neox_activation": ("gpt_neox", lambda c: _with(c, hidden_act="gelu_10"), "gelu_10"),
    "neox_dynamic_rope": (
        "gpt_neox", lambda c: _with(c, rope_parameters={**c["rope_parameters"], "rope_type": "dynamic"}), "dynamic",
    ),
    "neox_odd_rotary_dims": (
        "gpt_neox", lambda c: _with(c, rope_parameters={**c["rope_parameters"], "partial_rotary_factor": 0.1875}), "even",
    ),
    "neox_unknown_field": ("gpt_neox", lambda c: _with(c, sliding_window=16), "sliding_window"),
    "falcon_new_arch_sequential": (
        "falcon", lambda c: _with(c, new_decoder_architecture=True, parallel_attn=False), "parallel_attn",
    ),
    "falcon_two_norms_old_arch": ("falcon", lambda c: _with(c, num_ln_in_parallel_attn=2), "num_ln_in_parallel_attn"),
    "falcon_legacy_head_count": ("falcon", lambda c: _with(c, n_head=8), "n_head"),
    "falcon_mha_grouped": ("falcon", lambda c: _with(c, multi_query=False, num_kv_heads=2), "num_kv_heads"),
    "falcon_saved_kv_heads_disagree": (
        "falcon", lambda c: _with(c, num_key_value_heads=c["num_key_value_heads"] + 1), "num_key_value_heads=",
    ),
    "falcon_post_norm_residual": (
        "falcon", lambda c: _with(c, apply_residual_connection_post_layernorm=True), "post-layernorm",
    ),
    "falcon_activation": ("falcon", lambda c: _with(c, activation="gelu_10"), "gelu_10"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_config_raises(case):
    family, edit, fragment = UNSUPPORTED[case]
    valid = _hf_config_dict(family)
    families.config_from_hf(valid)  # the unedited config is accepted
    with pytest.raises(UnsupportedConfigError, match=fragment):
        families.config_from_hf(edit(valid))
