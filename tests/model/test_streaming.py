"""Streaming past the cache: against an independent token-by-token reference, and between routes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import streamjax
from streamjax.model.transformer import jitted_forward
from support.models import hf_logits, hf_state_dict, random_hf_llama, to_streamjax
from support.reference import llama_stream_logits

NUM_TOKENS = 300
TOKENS = np.random.RandomState(1).randint(0, 97, size=(1, NUM_TOKENS))


@pytest.fixture(scope="module")
def model():
    return random_hf_llama(seed=3, attention_bias=True, rope_theta=300.0)


@pytest.fixture(scope="module")
def converted(model):
    return to_streamjax(model)


def test_reference_is_dense_attention_while_nothing_is_evicted(model):
    inv_freq = model.model.rotary_emb.inv_freq.numpy().astype(np.float64)
    reference = llama_stream_logits(hf_state_dict(model), model.config, TOKENS[0, :40], 4, 60, inv_freq)
    np.testing.assert_allclose(reference, hf_logits(model, TOKENS[:, :40])[0], atol=1.4e-6, rtol=0)  # 4.5e-7


@pytest.mark.parametrize("num_sinks", [0, 1, 4])
@pytest.mark.parametrize("window", [3, 8, 17])
def test_streaming_past_the_cache_matches_reference(model, converted, num_sinks, window):
    config, params = converted
    inv_freq = model.model.rotary_emb.inv_freq.numpy().astype(np.float64)
    reference = llama_stream_logits(hf_state_dict(model), model.config, TOKENS[0], num_sinks, window, inv_freq)

    cache = streamjax.init_cache(config, 1, num_sinks, window)
    one_by_one, _ = streamjax.feed_tokens(params, cache, TOKENS, config)
    np.testing.assert_allclose(one_by_one[0], reference, atol=1.9e-6, rtol=0)  # measured 6.1e-7

    cache = streamjax.init_cache(config, 1, num_sinks, window)
    chunked, _ = streamjax.prefill(params, cache, TOKENS, config, chunk_size=2 * window + 5)
    np.testing.assert_allclose(chunked[0], reference, atol=1.9e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 33, NUM_TOKENS])
def test_prefill_longer_than_the_cache_equals_token_at_a_time(converted, chunk_size):
    config, params = converted
    cache = streamjax.init_cache(config, 1, num_sinks=4, window=16)
    expected_logits, expected_cache = streamjax.feed_tokens(params, cache, TOKENS, config)
    cache = streamjax.init_cache(config, 1, num_sinks=4, window=16)
    logits, cache = streamjax.prefill(params, cache, TOKENS, config, chunk_size=chunk_size)
    np.testing.assert_allclose(logits, expected_logits, atol=1.8e-6, rtol=0)  # measured 6.0e-7
    np.testing.assert_allclose(cache.keys, expected_cache.keys, atol=1e-6, rtol=0)  # 3.3e-7
    np.testing.assert_allclose(cache.values, expected_cache.values, atol=1.1e-6, rtol=0)  # 3.6e-7
    for field in ("slot_positions", "length", "cursor", "next_position"):
        np.testing.assert_array_equal(getattr(cache, field), getattr(expected_cache, field))


def _stack_streams(first, second):
    """One cache holding the streams of two single-stream caches (every array has the batch first)."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), first, second)


def test_streams_in_a_batch_keep_their_own_fill_state(converted):
    config, params = converted
    early, late = TOKENS[:, :50], TOKENS[:, 50:90]
    warm = streamjax.feed_tokens(params, streamjax.init_cache(config, 1, 2, 10), early, config)[1]
    cold = streamjax.init_cache(config, 1, 2, 10)
    batch_logits, _ = streamjax.prefill(params, _stack_streams(warm, cold), np.repeat(late, 2, 0), config, 16)

    warm = streamjax.feed_tokens(params, streamjax.init_cache(config, 1, 2, 10), early, config)[1]
    alone_warm, _ = streamjax.feed_tokens(params, warm, late, config)
    alone_cold, _ = streamjax.feed_tokens(params, streamjax.init_cache(config, 1, 2, 10), late, config)
    np.testing.assert_allclose(batch_logits[0], alone_warm[0], atol=1.1e-6, rtol=0)  # measured 3.6e-7
    np.testing.assert_allclose(batch_logits[1], alone_cold[0], atol=1.1e-6, rtol=0)
    assert not np.allclose(alone_warm, alone_cold, atol=1e-3)  # the two states really differ


@pytest.mark.parametrize("first_position", [2**31 - 100, 2**31, 2**40 + 7])
def test_stream_counter_near_and_past_2_31_changes_nothing(converted, first_position):
    config, params = converted
    cache = streamjax.init_cache(config, 1, num_sinks=4, window=16)
    expected, _ = streamjax.feed_tokens(params, cache, TOKENS[:, :200], config)
    cache = streamjax.init_cache(config, 1, num_sinks=4, window=16, first_position=first_position)
    logits, _ = streamjax.feed_tokens(params, cache, TOKENS[:, :200], config)
    np.testing.assert_array_equal(logits, expected)


def test_decode_step_compiles_once_over_thousands_of_steps(converted):
    config, params = converted
    jax.clear_caches()
    cache = streamjax.init_cache(config, 1, num_sinks=2, window=8, first_position=2**31 - 1500)
    tokens = np.random.RandomState(2).randint(0, 97, size=(3000, 1, 1))
    for column in tokens:
        logits, cache = streamjax.step(params, cache, column, config)
    logits.block_until_ready()
    assert jitted_forward._cache_size() == 1
    assert int(cache.length[0]) == 10 and int(cache.next_position[0]) == 2**31 - 1500 + 3000 - 2**32
