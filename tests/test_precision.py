"""bfloat16 end to end: bf16 params, cache and activations, float32 softmax, logits and NLL."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_state_dict, random_hf_llama

import streamjax
from streamjax import evaluation
from streamjax.weights import convert_tensors


@pytest.fixture(scope="module")
def converted():
    model = random_hf_llama(seed=1)
    config = streamjax.families.config_from_hf(model.config.to_dict())
    state = hf_state_dict(model)
    return config, convert_tensors(state, config), convert_tensors(state, config, jnp.bfloat16)


@pytest.mark.parametrize("route", ["token", "chunk"])
def test_bfloat16_evaluation_is_float32_nll_close_to_float32(converted, route):
    config, params, half = converted
    text = np.random.default_rng(0).integers(0, config.vocab_size, 40)
    spec = evaluation.EvalSpec("streaming", num_sinks=2, window=8, route=route, chunk_size=8)
    expected = evaluation.evaluate(params, config, text, spec)
    state = evaluation.init_state(config, spec, text.shape[0], jnp.bfloat16)
    state, nll = evaluation.advance(half, config, text, spec, state, text.shape[0])
    assert state.cache.keys[0].dtype == jnp.bfloat16 and nll.dtype == np.float32
    np.testing.assert_allclose(nll, expected, atol=0.03)  # measured 0.005; tokens' NLL spread is 0.3


def test_evaluate_keeps_the_cache_in_the_params_dtype_unless_told(converted):
    config, _, half = converted
    text = np.random.default_rng(2).integers(0, config.vocab_size, 24)
    spec = evaluation.EvalSpec("streaming", num_sinks=2, window=8, chunk_size=8)
    default = evaluation.evaluate(half, config, text, spec)
    np.testing.assert_array_equal(default, evaluation.evaluate(half, config, text, spec, jnp.bfloat16))
    assert not np.array_equal(default, evaluation.evaluate(half, config, text, spec, jnp.float32))


def test_bfloat16_params_stream_through_a_cache_of_another_dtype(converted):
    config, _, half = converted
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12))
    same, _ = streamjax.feed_tokens(half, streamjax.init_cache(config, 2, 2, 4, jnp.bfloat16), tokens, config)
    wider, cache = streamjax.feed_tokens(half, streamjax.init_cache(config, 2, 2, 4, jnp.float32), tokens, config)
    assert same.dtype == wider.dtype == jnp.float32 and cache.keys[0].dtype == jnp.float32
    np.testing.assert_allclose(wider, same, atol=0.03 * np.abs(same).max())
