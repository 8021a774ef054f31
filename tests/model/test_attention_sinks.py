"""Sink variants of the attention softmax (`ModelConfig.softmax`): "zero_sink" (softmax-off-by-one) and
"sink_logit" (a learned logit per query head, gpt-oss's `sinks`), against independent numpy references,
between the chunk and token routes, sharded, differentiated, and loaded from a Hugging Face directory.

Tiny random Llama (6 heads over 2 kv heads: G = 3, so a wrong head order of the sink logits shows) and
MPT (ALiBi); the sink logits ~ U(-1, 3), large enough that the sink takes a visible share.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import streamjax
from streamjax.files.weights import WeightsError, convert_tensors
from streamjax.model import families, sharding, transformer
from streamjax.model.config import SOFTMAX_VARIANTS, ModelConfig, UnsupportedConfigError
from support import reference_families
from support.models import cpu_devices_env, hf_state_dict, random_hf_llama, randomize_weights
from support.reference import kept_indices, llama_stream_logits
from support.reference_families import mpt_stream_logits

NUM_SINKS, WINDOW, NUM_TOKENS = 2, 6, 24  # the stream runs well past the cache of 8
TOKENS = np.random.RandomState(2).randint(0, 97, size=(1, NUM_TOKENS))
# max |got - reference| / max |reference| of float32 logits against the float64 references: about 3x the
# largest measured, 6.7e-7 (MPT; Llama 4.0e-7)
TOLERANCE = 2e-6


def _relative(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def sink_tensors(num_layers: int, num_heads: int, seed: int = 7) -> dict[str, np.ndarray]:
    """Random learned sink logits under their checkpoint names `model.layers.{i}.self_attn.sinks` [N]."""
    rng = np.random.default_rng(seed)
    return {
        f"model.layers.{i}.self_attn.sinks": rng.uniform(-1.0, 3.0, num_heads).astype(np.float32)
        for i in range(num_layers)
    }


def sink_llama_checkpoint(softmax: str, seed: int = 11, **overrides) -> tuple:
    """(hf model, config dict, tensors) of a tiny random Llama saved as `softmax` would be."""
    hf = random_hf_llama(seed=seed, **overrides)
    hf_config, tensors = hf.config.to_dict(), hf_state_dict(hf)
    if softmax != "standard":
        hf_config = {**hf_config, "model_type": "llama_attention_sink", "softmax": softmax}
    if softmax == "sink_logit":
        tensors.update(sink_tensors(hf.config.num_hidden_layers, hf.config.num_attention_heads))
    return hf, hf_config, tensors


@functools.cache
def llama(softmax: str) -> tuple:
    """(hf model, tensors, config, params) of the test Llama with `softmax`."""
    hf, hf_config, tensors = sink_llama_checkpoint(softmax)
    config = families.config_from_hf(hf_config)
    return hf, tensors, config, convert_tensors(tensors, config)


@functools.cache
def llama_reference(softmax: str) -> np.ndarray:
    hf, tensors, _, _ = llama(softmax)
    inv_freq = hf.model.rotary_emb.inv_freq.numpy().astype(np.float64)
    return llama_stream_logits(tensors, hf.config, TOKENS[0], NUM_SINKS, WINDOW, inv_freq, softmax=softmax)


def _routes(config, params, tokens=TOKENS, chunk_sizes=(5, 8, NUM_TOKENS)) -> dict[str, np.ndarray]:
    """Logits [B, T, V] of the token route and of the chunk route with each chunk size, streamed through S + W."""
    new_cache = lambda: streamjax.init_cache(config, tokens.shape[0], NUM_SINKS, WINDOW)  # noqa: E731
    out = {"token": streamjax.feed_tokens(params, new_cache(), tokens, config)[0]}
    for size in chunk_sizes:
        out[f"chunk {size}"] = streamjax.prefill(params, new_cache(), tokens, config, chunk_size=size)[0]
    return {route: np.asarray(logits) for route, logits in out.items()}


# ---------------------------------------------------------------- the config field


def test_softmax_field_is_checked():
    base = dict(
        family="llama", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
        intermediate_size=8, norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=16,
    )  # fmt: skip
    assert ModelConfig(**base).softmax == "standard"
    assert SOFTMAX_VARIANTS == ("standard", "zero_sink", "sink_logit")
    with pytest.raises(UnsupportedConfigError, match=r"unknown softmax 'off_by_one'.*'zero_sink', 'sink_logit'"):
        ModelConfig(**base, softmax="off_by_one")
    specs = families.param_specs(ModelConfig(**base, softmax="sink_logit"))["layers"][0]["sink_logit"]
    assert (specs.shape, specs.axes, specs.init) == ((2,), ("heads",), "zeros")
    for softmax in ("standard", "zero_sink"):
        assert "sink_logit" not in families.param_specs(ModelConfig(**base, softmax=softmax))["layers"][0]


# ---------------------------------------------------------------- against the numpy references, both routes


@pytest.mark.parametrize("softmax", ["zero_sink", "sink_logit"])
def test_llama_streaming_past_the_cache_matches_reference(softmax):
    """zero_sink: the reference with a key and value of zeros prepended; sink_logit: with each head's logit
    prepended; the token route and the chunk route (chunks shorter and longer than the cache) agree."""
    _, _, config, params = llama(softmax)
    reference = llama_reference(softmax)
    for route, logits in _routes(config, params).items():
        assert _relative(logits, reference) < TOLERANCE, route
    assert _relative(reference, llama_reference("standard")) > 1e-2  # the sink really changes the model


def test_sink_logits_follow_the_query_heads():
    """Query head n is g of kv head n // G: the same logits in another head order give other logits."""
    _, _, config, params = llama("sink_logit")
    shuffled = [{**p, "sink_logit": p["sink_logit"].reshape(2, 3).T.reshape(-1)} for p in params["layers"]]
    logits = _routes(config, {**params, "layers": shuffled}, chunk_sizes=(8,))["chunk 8"]
    assert _relative(logits, llama_reference("sink_logit")) > 1e-3


class _ZeroSinkStream(reference_families._Stream):
    """The family references' stream with a zero sink, for ALiBi models (no RoPE, K = N): every softmax
    gets one more logit, 0, with no distance bias, whose value is zeros."""

    def attend(self, layer, q, k, v, scale, inv_freq=None, slopes=None, alibi_before_scale=False):
        assert inv_freq is None and slopes is not None and not alibi_before_scale
        self.keys[layer].append(k)
        self.values[layer].append(v)
        kept = kept_indices(len(self.keys[layer]) - 1, self.num_sinks, self.window)
        keys, values = (np.stack([stored[layer][j] for j in kept]) for stored in (self.keys, self.values))
        distance = np.arange(len(kept)) - (len(kept) - 1)
        scores = np.einsum("nh,snh->ns", q, keys) * scale + slopes[:, None] * distance
        scores = np.concatenate([np.zeros((len(q), 1)), scores], axis=1)  # the zero sink
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        return np.einsum("ns,snh->nh", weights[:, 1:], values).reshape(-1)


@functools.cache
def mpt():
    """(hf model, slopes [N], standard config, params) of a tiny random MPT."""
    import torch
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(4)
    settings = dict(vocab_size=97, d_model=48, n_heads=6, n_layers=2, max_seq_len=256)
    hf = randomize_weights(MptForCausalLM(MptConfig(**settings)), 0.2)
    alibi = hf.transformer.build_mpt_alibi_tensor(6, 2)[:, 0].numpy()
    config = families.config_from_hf(hf.config.to_dict())
    return hf, (alibi[:, 1] - alibi[:, 0]).astype(np.float64), config, convert_tensors(hf_state_dict(hf), config)


def test_mpt_zero_sink_matches_reference_with_an_unbiased_zero_logit(monkeypatch):
    hf, slopes, config, params = mpt()
    stream = lambda: mpt_stream_logits(hf_state_dict(hf), hf.config, TOKENS[0], NUM_SINKS, WINDOW, slopes)  # noqa: E731
    standard = stream()
    assert _relative(_routes(config, params, chunk_sizes=(8,))["chunk 8"], standard) < TOLERANCE
    monkeypatch.setattr(reference_families, "_Stream", _ZeroSinkStream)
    reference = stream()
    assert _relative(reference, standard) > 1e-2
    zero_sink = dataclasses.replace(config, softmax="zero_sink")
    for route, logits in _routes(zero_sink, params, chunk_sizes=(5, NUM_TOKENS)).items():
        assert _relative(logits, reference) < TOLERANCE, route


# ---------------------------------------------------------------- attention maps


def _layer_weights(softmax: str) -> list[np.ndarray]:
    """Every layer's weights [N, T, S + C + T] of one 17-token chunk into an S + W = 8 cache (which the
    chunk's own tokens overrun: most queries see the sinks and a window of the chunk)."""
    _, _, config, params = llama(softmax)
    cache = streamjax.init_cache(config, 1, NUM_SINKS, WINDOW)
    out = streamjax.forward(params, cache, TOKENS[:, :17], config, return_weights=True)
    return [np.asarray(w[0], np.float64) for w in out.weights]


def test_attention_weights_sum_to_one_minus_the_sink_share():
    weights = {softmax: _layer_weights(softmax) for softmax in SOFTMAX_VARIANTS}
    for layer in weights["standard"]:
        np.testing.assert_allclose(layer.sum(-1), 1.0, atol=1e-6)
    sums = {softmax: [layer.sum(-1) for layer in weights[softmax]] for softmax in ("zero_sink", "sink_logit")}
    for softmax, layer_sums in sums.items():
        for total in layer_sums:
            assert 0 < total.min() and total.max() < 0.999, softmax
    # Layer 0 reads the same inputs and cache in every variant: its real keys keep the standard weights'
    # proportions, and the sink's odds (share / rest = e^c / Z, Z the real keys' sum of e^logit) give the
    # learned logit c of each head: log-odds of sink_logit minus those of zero_sink (c = 0) are c.
    for softmax in ("zero_sink", "sink_logit"):
        np.testing.assert_allclose(weights[softmax][0], weights["standard"][0] * sums[softmax][0][..., None], atol=1e-6)
    log_odds = {softmax: np.log((1 - sums[softmax][0]) / sums[softmax][0]) for softmax in sums}
    sinks = llama("sink_logit")[1]["model.layers.0.self_attn.sinks"]
    np.testing.assert_allclose(
        log_odds["sink_logit"] - log_odds["zero_sink"], np.repeat(sinks[:, None], 17, 1), atol=1e-4
    )


# ---------------------------------------------------------------- gradients


def test_gradient_reaches_the_sink_logits():
    """d NLL / d sink_logit of every layer is nonzero, and along it a central difference gives its norm
    (float32 loss: step 0.03 measured 0.1% off)."""
    _, _, config, params = llama("sink_logit")
    tokens = jnp.asarray(TOKENS[:, :16], jnp.int32)

    @jax.jit
    def loss(sinks):
        layers = [{**p, "sink_logit": sink} for p, sink in zip(params["layers"], sinks)]
        cache = streamjax.init_cache(config, 1, NUM_SINKS, WINDOW)
        return transformer.apply(
            {**params, "layers": layers}, cache, tokens[:, :-1], config, targets=tokens[:, 1:]
        ).nll.mean()

    sinks = [p["sink_logit"] for p in params["layers"]]
    gradient = [np.asarray(g) for g in jax.grad(loss)(sinks)]
    assert all(np.all(g != 0) for g in gradient)
    norm = np.linalg.norm(np.concatenate(gradient))
    shifted = lambda step: loss([s + step * g / norm for s, g in zip(sinks, gradient)])  # noqa: E731
    np.testing.assert_allclose((shifted(0.03) - shifted(-0.03)) / 0.06, norm, rtol=1e-2)


# ---------------------------------------------------------------- loading from a Hugging Face directory


def _save(directory, hf_config: dict, tensors: dict) -> None:
    from safetensors.numpy import save_file

    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, directory / "model.safetensors")


def test_sink_logit_directory_loads_with_its_sinks(tmp_path):
    _, hf_config, tensors = sink_llama_checkpoint("sink_logit")
    _save(tmp_path, hf_config, tensors)
    config, params = streamjax.load_hf_directory(tmp_path)
    assert (config.family, config.softmax) == ("llama", "sink_logit")
    for i, layer in enumerate(params["layers"]):
        np.testing.assert_array_equal(layer["sink_logit"], tensors[f"model.layers.{i}.self_attn.sinks"])
    expected = llama("sink_logit")[3]
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)
    assert _relative(_routes(config, params, chunk_sizes=())["token"], llama_reference("sink_logit")) < TOLERANCE


def test_zero_sink_directory_loads_without_sink_tensors(tmp_path):
    _, hf_config, tensors = sink_llama_checkpoint("zero_sink")
    _save(tmp_path, hf_config, tensors)
    config, params = streamjax.load_hf_directory(tmp_path)
    assert config.softmax == "zero_sink" and "sink_logit" not in params["layers"][0]


def test_sink_logit_directory_without_its_sinks_is_refused(tmp_path):
    _, hf_config, tensors = sink_llama_checkpoint("sink_logit")
    _save(tmp_path, hf_config, {k: v for k, v in tensors.items() if not k.endswith(".sinks")})
    with pytest.raises(WeightsError, match=r"self_attn\.sinks"):
        streamjax.load_hf_directory(tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "llama_attention_sink", "softmax": "off_by_one"}, "needs \"softmax\" set to .*'off_by_one'"),
        ({"model_type": "llama_attention_sink", "softmax": "standard"}, "needs \"softmax\" set to .*'standard'"),
        ({"model_type": "llama_attention_sink"}, 'needs "softmax" set to .*None'),
        ({"softmax": "sink_logit"}, "llama config sets softmax='sink_logit'.*llama_attention_sink"),
        ({"softmax": "standard"}, "llama config sets softmax='standard'"),
    ],
)
def test_bad_sink_configs_are_refused(tmp_path, changes, message):
    _, hf_config, tensors = sink_llama_checkpoint("standard")
    _save(tmp_path, {**hf_config, **changes}, tensors)
    with pytest.raises(UnsupportedConfigError, match=message):
        streamjax.load_hf_directory(tmp_path)


def test_other_families_refuse_a_softmax_field():
    hf_config = mpt()[0].config.to_dict()
    with pytest.raises(UnsupportedConfigError, match="does not handle: softmax"):
        families.config_from_hf({**hf_config, "softmax": "zero_sink"})


# ---------------------------------------------------------------- sharded == one device


SHARDED_MODEL = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=64, head_dim=8)


def measure_sharded() -> dict:
    """On 8 devices, mesh data=2, model=4 (heads split 4 ways): relative differences of sink_logit
    logits to one device, per route, and the shard shape of layer 0's sink_logit."""
    _, hf_config, tensors = sink_llama_checkpoint("sink_logit", **SHARDED_MODEL)
    config = families.config_from_hf(hf_config)
    params = convert_tensors(tensors, config)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, NUM_TOKENS))
    single = _routes(config, params, tokens, chunk_sizes=(8,))
    mesh = sharding.make_mesh("data=2,model=4", devices=jax.devices()[:8])
    sharded = sharding.shard_params(params, families.param_specs(config), mesh)
    new_cache = lambda: sharding.shard_cache(streamjax.init_cache(config, 2, NUM_SINKS, WINDOW), mesh)  # noqa: E731
    out = {"token": streamjax.feed_tokens(sharded, new_cache(), tokens, config)[0]}
    out["chunk 8"] = streamjax.prefill(sharded, new_cache(), tokens, config, chunk_size=8)[0]
    result = {route: _relative(logits, single[route]) for route, logits in out.items()}
    result["sink_shard"] = list(sharded["layers"][0]["sink_logit"].addressable_shards[0].data.shape)
    return result


def test_sharded_sink_logits_equal_one_device(tmp_path):
    path = tmp_path / "measured.json"
    child = subprocess.run(
        [sys.executable, __file__, str(path)], env=cpu_devices_env(8), capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 0, f"the 8-device run failed:\n{child.stdout[-3000:]}\n{child.stderr[-6000:]}"
    measured = json.loads(path.read_text())
    assert measured["sink_shard"] == [2]  # 8 heads over model=4
    for route in ("token", "chunk 8"):
        assert measured[route] < 1.3e-6, route  # sharding reorders sums only


if __name__ == "__main__":  # the 8-device child of the test above (the tests directory is its sys.path[0])
    with open(sys.argv[1], "w") as f:
        json.dump(measure_sharded(), f)
