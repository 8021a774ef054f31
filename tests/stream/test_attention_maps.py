"""Attention maps from the model's own forward pass equal Hugging Face's attention weights."""

from __future__ import annotations

import numpy as np
import pytest

from streamjax.stream import attention_maps
from support.models import random_hf_llama, to_streamjax


@pytest.fixture(scope="module")
def model():
    return random_hf_llama(num_hidden_layers=3, attn_implementation="eager")


def test_attention_maps_equal_hugging_face_attentions_averaged_over_heads(model):
    import torch

    config, params = to_streamjax(model)
    texts = np.random.default_rng(0).integers(0, config.vocab_size, (3, 16))
    maps = attention_maps.attention_maps(params, config, texts, layers=(0, 2))
    with torch.no_grad():
        attentions = model(torch.as_tensor(texts), output_attentions=True).attentions
    expected = np.stack([attentions[layer].numpy().mean(axis=(0, 1)) for layer in (0, 2)])
    assert maps.shape == (2, 16, 16)
    np.testing.assert_allclose(maps, expected, atol=4.5e-8, rtol=0)  # measured 1.5e-8
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=3.6e-7, rtol=0)  # measured 1.2e-7
    assert np.all(np.triu(maps, k=1) == 0)


def test_attention_maps_refuse_layers_the_model_does_not_have(model):
    config, params = to_streamjax(model)
    with pytest.raises(ValueError, match=r"layers \[3\] are not in the model's \[0, 3\)"):
        attention_maps.attention_maps(params, config, np.zeros((1, 4), np.int32), layers=(0, 3))


def test_sink_attention_share():
    uniform = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]  # query t spreads evenly over 0..t
    sink = np.zeros((4, 4))
    sink[:, 0] = 1.0
    shares = attention_maps.sink_attention_share(np.stack([uniform, sink]))
    np.testing.assert_allclose(shares, [(1 / 2 + 1 / 3 + 1 / 4) / 3, 1.0])
