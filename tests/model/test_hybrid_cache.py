"""The hybrid cache (a cache per layer type): sliding layers keep their own ring, full layers the sink cache.

A tiny random Qwen2 (q, k and v biases; 4 layers, layers 0 and 2 sliding with `sliding_window` 6, so they
see the 5 tokens before the query and themselves) is checked three ways: transformers' own logits while the
full layers' cache holds everything (the model's own attention), an independent numpy reference of the
hybrid cache past many evictions of both kinds of layer on both routes, and the slots the cache holds.
Its sliding layers rotate with their own RoPE base (as Gemma 3's do) in the streaming tests.
"""

import dataclasses

import jax
import numpy as np
import pytest

import streamjax
from streamjax.model import families
from streamjax.model.cache import layer_indices
from streamjax.model.config import ModelConfig
from streamjax.model.positions import rope_frequencies
from streamjax.model.transformer import jitted_forward
from support.models import hf_logits, hf_state_dict, randomize_weights
from support.reference import SlidingLayers, llama_stream_logits

SLIDING_WINDOW = 6  # keys a sliding layer sees, itself included
LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
VOCAB = 97
STREAMS = np.random.RandomState(5).randint(0, VOCAB, size=(2, 70))
# About 3x the largest differences measured: the reference against transformers 8.0e-6; the chunk route,
# the token route and a pass without a cache against transformers or the reference 1.7e-5 (logits reach 6.8).
REFERENCE, ROUTES = 2.4e-5, 5.1e-5


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    settings = {
        "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 4,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "use_sliding_window": True, "sliding_window": SLIDING_WINDOW,
        "layer_types": list(LAYER_TYPES), "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
    }  # fmt: skip
    torch.manual_seed(7)
    hf = Qwen2ForCausalLM(Qwen2Config(**settings, attn_implementation="eager"))
    return randomize_weights(hf, 0.2)


@pytest.fixture(scope="module")
def converted(model):
    """(config, params): Qwen2's full-attention conversion, given the model's layer types."""
    from streamjax.files.weights import convert_tensors

    full = {**model.config.to_dict(), "use_sliding_window": False, "layer_types": None, "sliding_window": None}
    config = families.config_from_hf({k: v for k, v in full.items() if v is not None})
    config = dataclasses.replace(config, layer_types=LAYER_TYPES, sliding_window=SLIDING_WINDOW)
    return config, convert_tensors(hf_state_dict(model), config)


def _reference(model, config, tokens, num_sinks, window, sliding_sinks=0, sliding_window=SLIDING_WINDOW - 1):
    sliding = SlidingLayers(
        tuple(layer_indices(config, "sliding_attention")),
        sliding_sinks,
        sliding_window,
        rope_frequencies(config, "sliding_attention").astype(np.float64),
    )
    inv_freq = rope_frequencies(config).astype(np.float64)
    return llama_stream_logits(hf_state_dict(model), model.config, tokens, num_sinks, window, inv_freq, sliding=sliding)


def test_reference_and_the_hybrid_cache_are_transformers_sliding_attention(model, converted):
    """Full layers holding every token, sliding layers their ring of 5: the model's own attention."""
    config, params = converted
    tokens = STREAMS[:, :40]
    expected = hf_logits(model, tokens)
    reference = _reference(model, config, tokens[0], num_sinks=4, window=60)
    np.testing.assert_allclose(reference, expected[0], atol=REFERENCE, rtol=0)

    cache = streamjax.init_cache(config, 2, num_sinks=4, window=60)
    chunked, _ = streamjax.prefill(params, cache, tokens, config, chunk_size=16)
    np.testing.assert_allclose(chunked, expected, atol=ROUTES, rtol=0)
    cache = streamjax.init_cache(config, 2, num_sinks=4, window=60)
    one_by_one, _ = streamjax.feed_tokens(params, cache, tokens, config)
    np.testing.assert_allclose(one_by_one, expected, atol=ROUTES, rtol=0)
    no_cache = streamjax.forward(params, None, tokens, config).logits  # a causal pass slides too
    np.testing.assert_allclose(no_cache, expected, atol=ROUTES, rtol=0)


@pytest.mark.parametrize(
    ("num_sinks", "window", "sliding_sinks", "sliding_window"),
    [(4, 9, 0, 5), (0, 7, 0, 5), (2, 5, 2, 5), (1, 12, 0, 3)],
    ids=["sinks", "window-attention", "sinks-on-every-layer", "smaller-sliding-ring"],
)
def test_hybrid_streaming_matches_reference_past_many_evictions(
    model, converted, num_sinks, window, sliding_sinks, sliding_window
):
    """70 tokens: the sliding rings lap about 13 times, the full layers' windows 5 to 10 times."""
    config, params = converted
    config = dataclasses.replace(config, sliding_rope_theta=37.0)  # the sliding layers' own RoPE base
    layout = dict(sliding_sinks=sliding_sinks, sliding_window=sliding_window)
    expected = np.stack(
        [_reference(model, config, stream, num_sinks, window, sliding_sinks, sliding_window) for stream in STREAMS]
    )
    cache = streamjax.init_cache(config, 2, num_sinks, window, **layout)
    chunked, chunked_cache = streamjax.prefill(params, cache, STREAMS, config, chunk_size=11)
    np.testing.assert_allclose(chunked, expected, atol=ROUTES, rtol=0)
    cache = streamjax.init_cache(config, 2, num_sinks, window, **layout)
    one_by_one, token_cache = streamjax.feed_tokens(params, cache, STREAMS, config)
    np.testing.assert_allclose(one_by_one, expected, atol=ROUTES, rtol=0)
    for field in ("slot_positions", "slot_tokens", "length", "cursor", "next_position"):
        for chunk_side, token_side in ((chunked_cache, token_cache), (chunked_cache.sliding, token_cache.sliding)):
            np.testing.assert_array_equal(getattr(chunk_side, field), getattr(token_side, field))


def test_partial_chunk_runs_in_the_full_chunks_program(converted):
    config, params = converted
    cache = streamjax.init_cache(config, 2, 2, 7)
    _, cache = streamjax.prefill(params, cache, STREAMS[:, :8], config, chunk_size=8)
    compiled = jitted_forward._cache_size()
    _, cache = streamjax.prefill(params, cache, STREAMS[:, 8:38], config, chunk_size=8)  # 3 full chunks, 1 of 6
    assert jitted_forward._cache_size() == compiled


GEMMA3_LIKE = ModelConfig(
    family="llama", vocab_size=32, hidden_size=16, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=8,
    intermediate_size=32, norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=32768,
    layer_types=tuple("full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)), sliding_window=512,
)  # fmt: skip


@pytest.mark.parametrize(("num_sinks", "window"), [(4, 1020), (0, 1024), (4, 252)])
def test_gemma3_stream_cache_has_constant_slots_counted_from_the_arrays(num_sinks, window):
    """15 sliding layers x 511 slots (their 512 keys are those 511 and the query) + 3 x (S + W)."""
    cache = jax.eval_shape(lambda: streamjax.init_cache(GEMMA3_LIKE, 1, num_sinks, window))
    key_slots = [k.shape[-1] for k in (*cache.keys, *cache.sliding.keys)]
    value_slots = [v.shape[-2] for v in (*cache.values, *cache.sliding.values)]
    assert key_slots == value_slots == [num_sinks + window] * 3 + [511] * 15  # full layers, then sliding
    assert cache.num_slots == 15 * 511 + 3 * (num_sinks + window) == sum(key_slots)


def test_bad_layouts_are_refused_before_compiling(converted):
    config, params = converted
    with pytest.raises(ValueError, match="keep more tokens than the model lets them see"):
        streamjax.init_cache(config, 1, 4, 12, sliding_window=SLIDING_WINDOW)
    plain = dataclasses.replace(config, layer_types=None, sliding_window=None)
    with pytest.raises(ValueError, match="no layer of this qwen2 model is a sliding layer"):
        streamjax.init_cache(plain, 1, 4, 12, sliding_sinks=4)
    with pytest.raises(ValueError, match="make the cache with init_cache"):
        streamjax.forward(params, streamjax.init_cache(plain, 1, 4, 12), STREAMS[:1, :4], config)
    with pytest.raises(ValueError, match="sliding_sinks must be >= 0"):
        streamjax.init_cache(config, 1, 4, 12, sliding_sinks=-1)
