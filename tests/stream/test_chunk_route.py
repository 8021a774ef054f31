"""The chunk route is exact: its per-token NLL equals the token route's (one token per forward pass).

Tiny random RoPE (Llama) and ALiBi (MPT) models in float32, caches that evict from the first chunk on,
chunk sizes from 1 to longer than the text, and batches of streams. One `real_assets` test repeats
the check on SmolLM2 over 5,000 tokens of Austen at the paper's 4 + 1020.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import streamjax
from streamjax.stream import perplexity
from support.models import random_hf_llama, randomize_weights, to_streamjax

VOCAB = 97
TEXT = np.random.RandomState(7).randint(0, VOCAB, size=71)  # 70 predictions: chunks of 64 leave 6
CHUNK_SIZES = (1, 7, 64, 1000)  # 1000 > the text: one forward pass for everything
# (family, num_sinks, window) -> the chunk sizes checked. Every cache evicts long before the text ends;
# each case compiles one function per chunk shape, so the chunk sizes are not crossed with every cache.
CASES = {
    ("rope", 1, 8): CHUNK_SIZES,
    ("rope", 4, 24): (7,),
    ("rope", 0, 16): (7,),
    ("alibi", 4, 24): CHUNK_SIZES,
    ("alibi", 1, 8): (7,),
    ("alibi", 0, 16): (7,),
}
TOLERANCE = 6.4e-6  # about 3x the largest difference measured on the tiny models, 2.1e-6
SMOLLM2_TOLERANCE = 1e-4  # NLL over 1,800 SmolLM2 predictions; measured 7.3e-5


def random_hf_mpt(seed: int = 0, std: float = 0.2):
    """A tiny `MptForCausalLM` (ALiBi, tied embeddings) with random weights, LayerNorm weights 1 + noise."""
    import torch
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    config = MptConfig(vocab_size=VOCAB, d_model=48, n_heads=6, n_layers=2, max_seq_len=256)
    return randomize_weights(MptForCausalLM(config), std)


@functools.cache
def converted(family: str):
    """(config, params) of a tiny random model: "rope" a Llama with GQA, "alibi" an MPT."""
    model = random_hf_llama(seed=11, rope_theta=500.0) if family == "rope" else random_hf_mpt(seed=12)
    return to_streamjax(model)


@functools.cache
def text_nll(family: str, num_sinks: int, window: int, route: str, chunk_size: int = 1) -> np.ndarray:
    config, params = converted(family)
    spec = perplexity.EvalSpec("streaming", num_sinks, window, route=route, chunk_size=chunk_size)
    return perplexity.evaluate(params, config, TEXT, spec)


def test_models_use_the_position_scheme_they_are_named_after():
    assert converted("rope")[0].position == "rope" and converted("alibi")[0].position == "alibi"


@pytest.mark.parametrize("family, num_sinks, window", sorted(CASES))
def test_chunk_route_nll_equals_token_route(family, num_sinks, window):
    expected = text_nll(family, num_sinks, window, "token")
    assert expected.shape == (TEXT.shape[0] - 1,) and np.all(np.isfinite(expected))
    for chunk_size in CASES[family, num_sinks, window]:
        chunked = text_nll(family, num_sinks, window, "chunk", chunk_size)
        np.testing.assert_allclose(chunked, expected, atol=TOLERANCE, rtol=0, err_msg=f"{chunk_size=}")


@pytest.mark.parametrize("family", ["rope", "alibi"])
def test_the_caches_evict_so_the_check_is_not_vacuous(family):
    """The three caches of a family give different NLLs, so each really drops tokens."""
    runs = [text_nll(f, s, w, "token") for f, s, w in CASES if f == family]
    for first in range(len(runs)):
        for second in range(first):
            assert np.abs(runs[first] - runs[second]).max() > 1e-2


def _batch_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """NLL [B, T - 1] of tokens[:, 1:] under logits [B, T, V] (float64 log-softmax)."""
    shifted = np.asarray(logits, np.float64)[:, :-1]
    shifted -= shifted.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("family", ["rope", "alibi"])
def test_batched_prefill_equals_batched_token_route(family):
    config, params = converted(family)
    tokens = np.random.RandomState(3).randint(0, VOCAB, size=(3, TEXT.shape[0]))
    logits, _ = streamjax.feed_tokens(params, streamjax.init_cache(config, 3, 4, 24), tokens, config)
    expected = _batch_nll(logits, tokens)
    chunked, _ = streamjax.prefill(params, streamjax.init_cache(config, 3, 4, 24), tokens, config, chunk_size=7)
    np.testing.assert_allclose(_batch_nll(chunked, tokens), expected, atol=TOLERANCE, rtol=0)
    # Each row of the batch is its stream alone: the NLL of a single-stream evaluation.
    spec = perplexity.EvalSpec("streaming", 4, 24, route="chunk", chunk_size=7)
    for row in range(3):
        np.testing.assert_allclose(
            perplexity.evaluate(params, config, tokens[row], spec), expected[row], atol=TOLERANCE
        )


@pytest.mark.real_assets
def test_smollm2_chunk_route_equals_token_route_on_austen(smollm2_gguf, austen_text):
    """1,800 tokens of Austen through SmolLM2 at 4 + 1020: chunks of 512 (the last one partial) against one
    token per pass, past the cache (776 predictions after its first eviction) and over four chunks."""
    from streamjax.files import corpora, loading

    config, params, tokenizer = loading.load_model("smollm2")
    tokens = corpora.load_corpus_tokens("austen", tokenizer, num_tokens=1800)
    assert tokens.shape == (1800,)
    nll = {}
    for route in ("chunk", "token"):
        nll[route] = perplexity.evaluate(params, config, tokens, perplexity.EvalSpec(route=route, chunk_size=512))
    difference = np.abs(nll["chunk"] - nll["token"])
    print(f"SmolLM2 chunk against token route: largest NLL difference {difference.max():.2e}, past the cache "
          f"{difference[1024:].max():.2e}")  # fmt: skip
    np.testing.assert_allclose(nll["chunk"], nll["token"], atol=SMOLLM2_TOLERANCE, rtol=0)
    assert 1.0 < nll["chunk"].mean() < 5.0  # a real language model on English text
