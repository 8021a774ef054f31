"""The chunk route against the independent numpy references, with nothing of streamjax in between.

Every family and layout variant the references in `reference.py` and `reference_families.py` cover
(Llama with GQA and biases, linear and llama3 RoPE scaling; every MPT, GPT-NeoX and Falcon variant of
`test_families`), a batch of two different streams, S in {0, 1, 4} with a window of 6 over 64 tokens
(each stream evicts from token S + 7 on, about ten laps of the ring), fed in chunks of 5 (the last one
partial), and with 4 sinks also in chunks of 16 and as one chunk. Each stream of the batch is compared
with the reference run on it alone.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import streamjax
from support.family_models import VARIANTS as FAMILY_VARIANTS
from support.family_models import converted, stream_reference
from support.models import hf_state_dict, random_hf_llama, to_streamjax
from support.reference import llama_stream_logits

VOCAB = 97
WINDOW = 6
STREAMS = np.random.RandomState(21).randint(0, VOCAB, size=(2, 64))
CHUNK_SIZES = (5, 16, 64)
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # fmt: skip
LLAMA_VARIANTS = {
    "llama_gqa_biases": dict(attention_bias=True, rope_theta=300.0),
    "llama_rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=500.0),
    "llama_rope_llama3": dict(rope_scaling=LLAMA3_SCALING, rope_theta=1000.0),
}
VARIANTS = sorted(LLAMA_VARIANTS) + sorted(FAMILY_VARIANTS)
TOLERANCE = 2.9e-5  # about 3x the largest difference measured, 9.5e-6 (the logits reach 8)


@functools.cache
def llama_model(variant: str):
    return random_hf_llama(seed=5, **LLAMA_VARIANTS[variant])


@functools.cache
def model_and_params(variant: str):
    return to_streamjax(llama_model(variant)) if variant in LLAMA_VARIANTS else converted(variant)


@functools.cache
def reference_logits(variant: str, num_sinks: int, stream: int) -> np.ndarray:
    """Logits [T, V] of one stream from the variant's independent numpy reference (float64)."""
    tokens = STREAMS[stream]
    if variant not in LLAMA_VARIANTS:
        return stream_reference(variant, tokens, num_sinks, WINDOW)
    model = llama_model(variant)
    inv_freq = model.model.rotary_emb.inv_freq.numpy().astype(np.float64)  # scaled as transformers scales it
    return llama_stream_logits(hf_state_dict(model), model.config, tokens, num_sinks, WINDOW, inv_freq)


def chunked_logits(variant: str, num_sinks: int, chunk_size: int) -> np.ndarray:
    config, params = model_and_params(variant)
    cache = streamjax.init_cache(config, STREAMS.shape[0], num_sinks, WINDOW)
    return np.asarray(streamjax.prefill(params, cache, STREAMS, config, chunk_size=chunk_size)[0])


@pytest.mark.parametrize("num_sinks", [0, 1, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunk_route_equals_the_reference_past_the_cache(variant, num_sinks):
    # Every chunk size with 4 sinks; chunks of 5 (the last one partial) with 0 and 1 (each size compiles).
    for chunk_size in CHUNK_SIZES if num_sinks == 4 else CHUNK_SIZES[:1]:
        logits = chunked_logits(variant, num_sinks, chunk_size)
        for stream in range(STREAMS.shape[0]):
            expected = reference_logits(variant, num_sinks, stream)
            np.testing.assert_allclose(
                logits[stream], expected, atol=TOLERANCE, rtol=0, err_msg=f"{chunk_size=} {stream=}"
            )


@pytest.mark.parametrize("variant", ["llama_rope_linear", "llama_rope_llama3", "falcon_rw_alibi_sequential_bias"])
def test_the_reference_really_evicts(variant):
    """Sinks and window change the reference's logits past the cache, so the comparison above is not vacuous."""
    runs = [reference_logits(variant, num_sinks, 0) for num_sinks in (0, 1, 4)]
    assert all(np.abs(a - b)[WINDOW + 5 :].max() > 1e-2 for a, b in zip(runs, runs[1:]))
    # ... and agree while nothing is evicted (the first WINDOW + 1 tokens see everything before them).
    assert all(np.array_equal(a[: WINDOW + 1], b[: WINDOW + 1]) for a, b in zip(runs, runs[1:]))
