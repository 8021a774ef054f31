"""Families are added through the written protocol of `streamjax.families` alone.

A toy family (`toy_family.py`: one file, registered with one call) runs through `streamjax.forward`
and its logits equal a dense numpy forward written here from its definition; the registry refuses a
module that lacks part of the protocol and a second claim on a Hugging Face model type.
"""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

import streamjax
from streamjax.files.weights import convert_tensors
from streamjax.model import families
from streamjax.model.params import init_params
from support import toy_family

TOKENS = np.random.RandomState(4).randint(0, 61, size=(2, 20))


@pytest.fixture
def toy():
    """The toy family registered for one test, and its (config, params)."""
    families.register(toy_family)
    try:
        config = families.config_from_hf({"model_type": "toy", "vocab": 61, "dim": 32, "heads": 4, "layers": 2})
        yield config, init_params(families.param_specs(config), jax.random.key(0), scale=0.3)
    finally:
        families.FAMILIES.pop("toy")


def _rope(x, positions, theta):
    """x [T, heads, H] rotated by `positions` [T] (half-split layout)."""
    half = x.shape[-1] // 2
    angles = positions[:, None, None] * theta ** (-np.arange(half) / half)
    first, second = x[..., :half], x[..., half:]
    return np.concatenate(
        [first * np.cos(angles) - second * np.sin(angles), second * np.cos(angles) + first * np.sin(angles)], -1
    )


def dense_reference(config, params, tokens: np.ndarray) -> np.ndarray:
    """Logits [T, V] of the toy model over one text, dense causal attention, float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    norm = lambda x: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)  # noqa: E731
    x, length, positions = p["embed"][tokens], len(tokens), np.arange(len(tokens), dtype=np.float64)
    for layer in p["layers"]:
        qkv = np.einsum("td,dkph->tkph", norm(x), layer["qkv"])  # K = N: parts are q, k, v
        q, k, v = (_rope(qkv[:, :, i], positions, config.rope_theta) if i < 2 else qkv[:, :, i] for i in range(3))
        scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(config.head_dim)
        scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + np.einsum("nts,snh->tnh", weights, v).reshape(length, -1) @ layer["o"].reshape(-1, x.shape[1])
        x = x + np.maximum(norm(x) @ layer["up"], 0) @ layer["down"]
    return norm(x) @ p["embed"].T


def test_a_family_registered_through_the_protocol_matches_its_reference(toy):
    config, params = toy
    assert families.get(config).name == "toy" and config.family == "toy"
    cache = streamjax.init_cache(config, 2, num_sinks=2, window=30)  # holds every token: dense attention
    logits = streamjax.forward(params, cache, TOKENS, config).logits
    for row in range(2):
        np.testing.assert_allclose(logits[row], dense_reference(config, params, TOKENS[row]), atol=6.7e-6, rtol=0)
    no_cache = streamjax.forward(params, None, TOKENS, config).logits  # a plain causal pass
    np.testing.assert_allclose(no_cache, logits, atol=4.8e-6, rtol=0)  # measured 2.2e-6 and 1.6e-6


def test_a_registered_family_loads_by_its_own_tensor_rules(toy):
    config, params = toy
    tensors = {"embed.weight": np.asarray(params["embed"])}
    tensors.update(
        {f"layers.{i}.{k}": np.asarray(v) for i, layer in enumerate(params["layers"]) for k, v in layer.items()}
    )
    loaded = convert_tensors(tensors, config)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, params))


def test_a_module_lacking_part_of_the_protocol_is_refused():
    incomplete = types.ModuleType("incomplete")
    incomplete.NAME, incomplete.HF_MODEL_TYPES = "incomplete", ("incomplete",)
    incomplete.decoder_layer = toy_family.decoder_layer
    with pytest.raises(TypeError, match="lacks TIED_HEAD, config_from_hf, layer_specs, final_norm_specs"):
        families.register(incomplete)
    assert "incomplete" not in families.FAMILIES


def test_a_second_claim_on_a_hugging_face_model_type_is_refused():
    impostor = types.ModuleType("impostor")
    for name in ("TIED_HEAD", *families._FUNCTIONS):
        setattr(impostor, name, getattr(toy_family, name))
    impostor.NAME, impostor.HF_MODEL_TYPES = "impostor", ("llama",)
    with pytest.raises(ValueError, match=r"already registered: \['llama'\]"):
        families.register(impostor)
    assert "impostor" not in families.FAMILIES


def test_every_built_in_family_is_registered_under_its_hugging_face_type():
    assert {name: family.hf_model_types for name, family in families.FAMILIES.items()} == {
        "llama": ("llama", "llama_attention_sink"), "qwen2": ("qwen2",), "qwen3": ("qwen3",), "mistral": ("mistral",),
        "gemma2": ("gemma2",), "gemma3": ("gemma3_text",), "mpt": ("mpt",), "gpt_neox": ("gpt_neox",), "falcon": ("falcon",),
    }  # fmt: skip
