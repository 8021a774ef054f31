"""Half precision end to end: bfloat16 or float16 params, cache and activations; float32 softmax,
logits and NLL. The cache is always in the params' dtype."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import streamjax
from streamjax.files.weights import convert_tensors
from streamjax.model.transformer import jitted_forward
from streamjax.stream import perplexity
from support.models import hf_state_dict, random_hf_llama

HALF_TOLERANCE = {"bfloat16": 0.016, "float16": 0.0018}  # NLL, absolute: 3x the measured 5.1e-3 and 6.0e-4


@pytest.fixture(scope="module")
def converted():
    model = random_hf_llama(seed=1)
    config = streamjax.families.config_from_hf(model.config.to_dict())
    state = hf_state_dict(model)
    return config, convert_tensors(state, config), state


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("route", ["token", "chunk"])
def test_half_precision_evaluation_is_float32_nll_close_to_float32(converted, route, dtype):
    config, params, state_dict = converted
    half = convert_tensors(state_dict, config, jnp.dtype(dtype))
    text = np.random.default_rng(0).integers(0, config.vocab_size, 40)
    spec = perplexity.EvalSpec("streaming", num_sinks=2, window=8, route=route, chunk_size=8)
    expected = perplexity.evaluate(params, config, text, spec)
    state = perplexity.init_state(config, spec, text.shape[0], jnp.dtype(dtype))
    state, nll = perplexity.score_next(half, config, text, spec, state, text.shape[0])
    assert state.cache.keys[0].dtype == jnp.dtype(dtype) and nll.dtype == np.float32
    np.testing.assert_allclose(nll, expected, atol=HALF_TOLERANCE[dtype])


def test_a_cache_in_another_dtype_than_the_params_is_refused_before_compiling(converted):
    config, params, _ = converted
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12))
    compiled = jitted_forward._cache_size()
    for feed in (streamjax.step, streamjax.prefill, streamjax.feed_tokens):
        cache = streamjax.init_cache(config, 2, 2, 4, jnp.bfloat16)
        with pytest.raises(ValueError, match=r"cache holds bfloat16 keys and values but the params are float32"):
            feed(params, cache, tokens, config)
    assert jitted_forward._cache_size() == compiled
