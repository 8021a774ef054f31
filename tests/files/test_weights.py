"""Loading Hugging Face checkpoint directories, and the errors bad checkpoints and inputs give."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import streamjax
from streamjax.files.weights import WeightsError, read_hf_directory
from streamjax.model import sharding
from streamjax.model.config import UnsupportedConfigError
from streamjax.model.transformer import check_tokens, jitted_forward
from support.models import hf_logits, hf_state_dict, random_hf_llama

TOKENS = np.random.RandomState(0).randint(0, 97, size=(1, 24))


@pytest.fixture(scope="module")
def model():
    return random_hf_llama(seed=5)


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_saved_directory_loads_to_the_same_logits(model, tmp_path, shard_size):
    kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    model.save_pretrained(tmp_path, **kwargs)
    config, params = streamjax.load_hf_directory(tmp_path)
    logits, _ = streamjax.prefill(params, streamjax.init_cache(config, 1, 4, 60), TOKENS, config)
    np.testing.assert_allclose(logits, hf_logits(model, TOKENS), atol=8.1e-7, rtol=0)  # measured 2.7e-7


def test_sharded_save_really_has_several_files(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert len(read_hf_directory(tmp_path)[1]) == len(model.state_dict())


def test_load_onto_a_mesh_places_every_param_by_the_rules(model, tmp_path):
    """The one-device case of loading onto shards (8 devices: tests/test_ppl.py); same values as without."""
    model.save_pretrained(tmp_path)
    mesh = sharding.make_mesh("data=1,model=1", devices=jax.devices()[:1])
    config, params = streamjax.load_hf_directory(tmp_path, jnp.bfloat16, mesh=mesh)
    _, plain = streamjax.load_hf_directory(tmp_path, jnp.bfloat16)
    wanted = sharding.param_shardings(streamjax.families.param_specs(config), mesh)
    for param, expected, sharded in zip(*map(jax.tree.leaves, (plain, params, wanted))):
        assert expected.sharding == sharded and expected.dtype == jnp.bfloat16
        np.testing.assert_array_equal(expected, param)


def test_bfloat16_load(model, tmp_path):
    model.save_pretrained(tmp_path)
    config, params = streamjax.load_hf_directory(tmp_path, dtype=jnp.bfloat16)
    assert params["layers"][0]["qkv"].dtype == jnp.bfloat16
    cache = streamjax.init_cache(config, 1, 4, 60, dtype=jnp.bfloat16)
    logits, _ = streamjax.prefill(params, cache, TOKENS, config)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, hf_logits(model, TOKENS), atol=0.022, rtol=0)  # measured 7.2e-3


def _write_checkpoint(directory, hf_config: dict, tensors: dict):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, directory / "model.safetensors")


def test_missing_tensor_is_named(model, tmp_path):
    tensors = hf_state_dict(model)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _write_checkpoint(tmp_path, model.config.to_dict(), tensors)
    with pytest.raises(WeightsError, match=r"missing .*model\.layers\.1\.mlp\.up_proj\.weight"):
        streamjax.load_hf_directory(tmp_path)


def test_unexpected_tensor_is_named(model, tmp_path):
    tensors = hf_state_dict(model) | {"model.layers.0.extra.weight": np.zeros(3, np.float32)}
    _write_checkpoint(tmp_path, model.config.to_dict(), tensors)
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.extra\.weight"):
        streamjax.load_hf_directory(tmp_path)


def test_misshaped_tensor_is_named(model, tmp_path):
    tensors = hf_state_dict(model)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 48), np.float32)
    _write_checkpoint(tmp_path, model.config.to_dict(), tensors)
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight \(8, 48\)"):
        streamjax.load_hf_directory(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sliding_window": 16}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "yarn"),
        ({"model_type": "bert"}, "model_type 'bert'"),
    ],
)
def test_unsupported_config_is_refused_before_reading_tensors(model, tmp_path, change, message):
    _write_checkpoint(tmp_path, model.config.to_dict() | change, {})
    with pytest.raises(UnsupportedConfigError, match=message):
        streamjax.load_hf_directory(tmp_path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        streamjax.load_hf_directory(tmp_path)


@pytest.mark.parametrize("bad", [[[97]], [[-1]], [[3, 200]]])
def test_token_outside_the_vocabulary_is_refused_before_compiling(model, bad):
    config, params = streamjax.families.config_from_hf(model.config.to_dict()), None
    cache = streamjax.init_cache(config, 1, 2, 4)
    compiled = jitted_forward._cache_size()
    for feed in (streamjax.step, streamjax.feed_tokens, streamjax.prefill):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            feed(params, cache, np.array(bad), config)
    assert jitted_forward._cache_size() == compiled


def test_tokens_on_device_are_checked_by_shape_and_dtype_alone(model):
    """A jax.Array's ids are never read (that would copy it to the host every decode step); its metadata is."""
    config = streamjax.families.config_from_hf(model.config.to_dict())
    cache = streamjax.init_cache(config, 1, 2, 4)
    outside = jnp.array([[5, config.vocab_size]])
    outside.delete()  # only its shape and dtype are left to read
    check_tokens(outside, config, cache)
    for tokens, message in [([1, 2], "shape"), ([[1], [2]], "batch"), ([[1.0]], "integer ids")]:
        with pytest.raises(ValueError, match=message):
            check_tokens(jnp.array(tokens), config, cache)


def test_tokens_of_the_wrong_shape_are_refused(model):
    config = streamjax.families.config_from_hf(model.config.to_dict())
    with pytest.raises(ValueError, match="shape"):
        streamjax.step(None, streamjax.init_cache(config, 1, 2, 4), np.array([1, 2]), config)
    with pytest.raises(ValueError, match="batch"):
        streamjax.step(None, streamjax.init_cache(config, 1, 2, 4), np.array([[1], [2]]), config)
