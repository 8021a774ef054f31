"""Llama-family logits against transformers.LlamaForCausalLM (torch, CPU, float32)."""

import numpy as np
import pytest

import streamjax
from support.models import hf_logits, random_hf_llama, to_streamjax

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}  # fmt: skip
VARIANTS = {
    "mha": dict(num_attention_heads=6, num_key_value_heads=6),
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=6, num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=500.0),
    "rope_llama3": dict(rope_scaling=LLAMA3_SCALING, rope_theta=50000.0),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "wide_head_dim": dict(head_dim=16, rms_norm_eps=1e-5),
}
TOKENS = np.random.RandomState(0).randint(0, 97, size=(2, 48))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dense_logits_match_transformers(variant):
    model = random_hf_llama(**VARIANTS[variant])
    config, params = to_streamjax(model)
    expected = hf_logits(model, TOKENS)

    cache = streamjax.init_cache(config, 2, num_sinks=4, window=60)
    chunked, _ = streamjax.prefill(params, cache, TOKENS, config, chunk_size=20)
    np.testing.assert_allclose(chunked, expected, atol=1.5e-6, rtol=0)  # measured 4.8e-7

    cache = streamjax.init_cache(config, 2, num_sinks=4, window=60)
    one_by_one, _ = streamjax.feed_tokens(params, cache, TOKENS, config)
    np.testing.assert_allclose(one_by_one, expected, atol=1.5e-6, rtol=0)


def test_config_records_hf_fields():
    model = random_hf_llama(rope_scaling=LLAMA3_SCALING, rope_theta=50000.0, num_key_value_heads=1)
    config, _ = to_streamjax(model)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.rope_theta) == (6, 1, 8, 50000.0)
    assert config.rope_scaling_dict["rope_type"] == "llama3"
    assert hash(config) == hash(to_streamjax(model)[0])  # static jit argument


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "linear", "factor": 2.0, "attention_factor": 1.5}, "does not handle: attention_factor"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "lacks the fields high_freq_factor"),
        ({"rope_type": "yarn", "factor": 4.0}, "rope type 'yarn'"),
        ({"type": "linear", "factor": 2.0, "finetuned": True}, "does not handle: finetuned"),
    ],
)
def test_rope_fields_streamjax_does_not_compute_are_refused(rope, message):
    from streamjax.model.config import UnsupportedConfigError

    hf = random_hf_llama().config.to_dict()
    hf.pop("rope_parameters", None)
    with pytest.raises(UnsupportedConfigError, match=message):
        streamjax.families.config_from_hf({**hf, "rope_scaling": rope})
