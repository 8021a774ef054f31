"""Sharded runs over a ("data", "model") mesh equal single-device runs, and really are sharded.

XLA fixes the number of CPU devices when jax starts, so the 8-device runs happen once, in a child
process (this file run as a script with XLA_FLAGS=--xla_force_host_platform_device_count=8), unless
this process already has 8 devices. `measure` records differences to the single-device run, shard
shapes and dtypes; the tests assert on them. Two tiny random Llamas: "even" (16 heads, 8 kv heads,
MLP 128, vocab 128: every split divides) and "odd" (9 heads, 3 kv heads like SmolLM2, MLP 96,
vocab 97: heads, kv heads and vocab fall back to replication, the MLP still splits).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from streamjax.model import families, sharding
from streamjax.model.config import ModelConfig
from streamjax.model.params import ParamSpec

MESHES = {"2x4": {"data": 2, "model": 4}, "1x8": {"data": 1, "model": 8}, "4x2": {"data": 4, "model": 2}}
MODELS = {
    "even": {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 8},
    "odd": {"vocab_size": 97, "hidden_size": 72, "intermediate_size": 96, "num_attention_heads": 9, "num_key_value_heads": 3},
}  # fmt: skip
# "hybrid" is "even" with layer 0 sliding over 4 keys (a ring of 3, its own RoPE base): the hybrid cache's two parts.
HYBRID = {"layer_types": ("sliding_attention", "full_attention"), "sliding_window": 4, "sliding_rope_theta": 50.0}
CASES = ["even/2x4", "even/1x8", "even/4x2", "odd/2x4", "hybrid/2x4"]
BATCH, LENGTH, TEXT_LENGTH, NUM_SINKS, WINDOW, CHUNK = 4, 24, 25, 2, 6, 6  # every chunk is CHUNK long
TOLERANCE = 1.3e-6  # max |sharded - single| / max |single|, float32: about 3x the measured 4.4e-7
BF16_TOLERANCE = 2.4e-2  # bfloat16 logits: about 3x the measured 8.1e-3


# ---------------------------------------------------------------- what the 8-device child measures


def _relative(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _shard_shapes(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): list(leaf.addressable_shards[0].data.shape) for path, leaf in leaves}


def _all_keys(cache) -> np.ndarray:
    """Every layer's cached keys, a hybrid cache's sliding layers' too, flattened into one array."""
    parts = [*cache.keys, *(cache.sliding.keys if cache.sliding is not None else ())]
    return np.concatenate([np.asarray(keys).ravel() for keys in parts])


def _reference(name: str) -> dict:
    """Single-device results of model `name`, computed once for every mesh."""
    from streamjax import init_cache
    from streamjax.stream import feed, perplexity
    from support.models import random_hf_llama, to_streamjax

    hf = random_hf_llama(seed=3, **MODELS["even" if name == "hybrid" else name])
    config, params = to_streamjax(hf)
    config = dataclasses.replace(config, **HYBRID) if name == "hybrid" else config
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (BATCH, LENGTH))
    text = np.random.default_rng(1).integers(0, config.vocab_size, TEXT_LENGTH)
    new_cache = lambda dtype=jnp.float32: init_cache(config, BATCH, NUM_SINKS, WINDOW, dtype)
    routes = {
        "token": lambda p, c: feed.feed_tokens(p, c, tokens, config),
        "chunk": lambda p, c: feed.prefill(p, c, tokens, config, chunk_size=CHUNK),
    }
    eval_specs = {
        route: perplexity.EvalSpec("streaming", NUM_SINKS, WINDOW, route=route, chunk_size=CHUNK) for route in routes
    }
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    return {
        "hf": hf, "config": config, "params": params, "text": text, "new_cache": new_cache, "routes": routes,
        "eval_specs": eval_specs, "outputs": {route: run(params, new_cache()) for route, run in routes.items()},
        "nll": {route: perplexity.evaluate(params, config, text, spec) for route, spec in eval_specs.items()},
        "bf16": routes["token"](half, new_cache(jnp.bfloat16))[0],
    }  # fmt: skip


def _measure(ref: dict, mesh_name: str) -> dict:
    from streamjax.files.weights import convert_tensors
    from streamjax.model import transformer
    from streamjax.stream import perplexity
    from support.models import hf_state_dict

    config, params, new_cache = ref["config"], ref["params"], ref["new_cache"]
    specs = families.param_specs(config)
    mesh = sharding.make_mesh(MESHES[mesh_name], devices=jax.devices()[:8])
    loaded = convert_tensors(hf_state_dict(ref["hf"]), config, place=sharding.placer(specs, mesh))
    sharded = sharding.shard_params(params, specs, mesh)
    out = {"params": _shard_shapes(sharded), "loaded_params": _shard_shapes(loaded)}
    out["loaded_equal"] = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), loaded, sharded)))
    for route, run in ref["routes"].items():
        expected, expected_cache = ref["outputs"][route]
        compiled_before = transformer.jitted_forward._cache_size()
        logits, cache = run(sharded, sharding.shard_cache(new_cache(), mesh))
        if route == "chunk":  # prefill fed LENGTH / CHUNK chunks, each taking the cache the previous one returned
            out["chunk_compiles"] = transformer.jitted_forward._cache_size() - compiled_before
        out[f"logits/{route}"] = _relative(logits, expected)
        out[f"cache/{route}"] = _relative(_all_keys(cache), _all_keys(expected_cache))
        out[f"cache_shards/{route}"] = _shard_shapes(cache)
        wanted = jax.tree.leaves(sharding.cache_shardings(cache, mesh))
        out[f"cache_kept/{route}"] = all(
            x.sharding.is_equivalent_to(w, x.ndim) for x, w in zip(jax.tree.leaves(cache), wanted)
        )
        spec = ref["eval_specs"][route]
        state = perplexity.init_state(config, spec, ref["text"].shape[0], jnp.float32)
        state.cache = sharding.shard_cache(state.cache, mesh)
        _, nll = perplexity.score_next(sharded, config, ref["text"], spec, state, ref["text"].shape[0])
        out[f"nll/{route}"] = _relative(nll, ref["nll"][route])
    if mesh_name == "2x4":
        half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), sharded)
        logits, cache = ref["routes"]["token"](half, sharding.shard_cache(new_cache(jnp.bfloat16), mesh))
        out["bf16"] = {
            "logits": _relative(logits, ref["bf16"]),
            "dtypes": [str(logits.dtype), str(cache.keys[0].dtype)],
        }
    return out


def measure() -> dict:
    """Everything the tests assert on, for every case (needs 8 devices)."""
    references = {name: _reference(name) for name in {case.split("/")[0] for case in CASES}}
    return {case: _measure(references[case.split("/")[0]], case.split("/")[1]) for case in CASES}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    if jax.device_count() >= 8:
        return measure()
    from support.models import cpu_devices_env

    path = tmp_path_factory.mktemp("sharding") / "measured.json"
    env = cpu_devices_env(8)
    child = subprocess.run(
        [sys.executable, __file__, str(path)], env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    if child.returncode:
        pytest.fail(f"the 8-device run failed:\n{child.stdout[-3000:]}\n{child.stderr[-6000:]}")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- sharded == single device


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("route", ["token", "chunk"])
def test_sharded_logits_cache_and_nll_equal_single_device(measured, case, route):
    result = measured[case]
    assert result[f"logits/{route}"] < TOLERANCE
    assert result[f"cache/{route}"] < TOLERANCE
    assert result[f"nll/{route}"] < TOLERANCE


def test_largest_relative_difference_to_a_single_device_run(measured):
    """The figure the README quotes: printed (pytest -s or -rP shows it) and held under TOLERANCE."""
    largest = max(
        measured[case][f"{what}/{route}"]
        for case in CASES
        for what in ("logits", "cache", "nll")
        for route in ("token", "chunk")
    )
    print(f"largest relative difference of a sharded run to the single-device run: {largest:.1e}")
    assert 0 < largest < TOLERANCE  # 0 would mean nothing was split: the comparison would show nothing


@pytest.mark.parametrize("case", ["even/2x4", "odd/2x4"])
def test_bfloat16_sharded_run_matches_single_device_and_keeps_dtypes(measured, case):
    result = measured[case]["bf16"]
    assert result["dtypes"] == ["float32", "bfloat16"]  # logits, cache
    print(f"{case}: largest relative difference of bfloat16 sharded logits: {result['logits']:.1e}")
    assert result["logits"] < BF16_TOLERANCE  # bfloat16 partial sums are added in another order across shards


@pytest.mark.parametrize("case", CASES)
def test_chunks_compile_once_under_a_mesh(measured, case):
    """The cache a jitted step returns has the shardings it came in with, so the next chunk reuses the program."""
    assert measured[case]["chunk_compiles"] == 1


# ---------------------------------------------------------------- really sharded, by the rule table

B, C = BATCH, NUM_SINKS + WINDOW
# (qkv, o, gate_up, down, embed, attn_norm) shard shapes of layer 0, written out by hand from LOGICAL_RULES.
EXPECTED_PARAM_SHARDS = {
    "even/2x4": ([64, 2, 4, 8], [4, 8, 64], [64, 2, 32], [32, 64], [32, 64], [64]),
    "even/1x8": ([64, 1, 4, 8], [2, 8, 64], [64, 2, 16], [16, 64], [16, 64], [64]),
    "even/4x2": ([64, 4, 4, 8], [8, 8, 64], [64, 2, 64], [64, 64], [64, 64], [64]),
    "odd/2x4": ([72, 3, 5, 8], [9, 8, 72], [72, 2, 24], [24, 72], [97, 72], [72]),
}
EXPECTED_PARAM_SHARDS["hybrid/2x4"] = EXPECTED_PARAM_SHARDS["even/2x4"]
# each layer's cache values [B, K, C, H] (keys: [B, K, H, C]) and slot_positions [B, C] shard shapes
# after a sharded run.
EXPECTED_CACHE_SHARDS = {
    "even/2x4": ([2, 2, C, 8], [2, C]),
    "even/1x8": ([4, 1, C, 8], [4, C]),
    "even/4x2": ([1, 4, C, 8], [1, C]),
    "odd/2x4": ([2, 3, C, 8], [2, C]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("which", ["params", "loaded_params"])
def test_params_are_split_by_the_rules(measured, case, which):
    shards = measured[case][which]
    names = (
        "['layers'][0]['qkv']",
        "['layers'][0]['o']",
        "['layers'][0]['gate_up']",
        "['layers'][0]['down']",
        "['embed']",
        "['layers'][0]['attn_norm']",
    )
    assert tuple(shards[name] for name in names) == EXPECTED_PARAM_SHARDS[case]
    assert measured[case]["loaded_equal"]


@pytest.mark.parametrize("case", [case for case in CASES if not case.startswith("hybrid")])
@pytest.mark.parametrize("route", ["token", "chunk"])
def test_cache_stays_split_after_jitted_runs(measured, case, route):
    shards = measured[case][f"cache_shards/{route}"]
    values, slot_positions = EXPECTED_CACHE_SHARDS[case]
    assert (shards[".values[0]"], shards[".slot_positions"]) == (values, slot_positions)
    assert shards[".values[1]"] == values and shards[".keys[0]"] == shards[".keys[1]"] == [*values[:2], 8, C]
    assert shards[".length"] == [EXPECTED_CACHE_SHARDS[case][1][0]]
    assert measured[case][f"cache_kept/{route}"]


@pytest.mark.parametrize("route", ["token", "chunk"])
def test_hybrid_cache_parts_stay_split_after_jitted_runs(measured, route):
    """Layer 1 (full) in the sink cache of C slots, layer 0 (sliding) in its ring of 3: both split alike."""
    shards = measured["hybrid/2x4"][f"cache_shards/{route}"]
    assert (shards[".values[0]"], shards[".keys[0]"], shards[".slot_positions"]) == ([2, 2, C, 8], [2, 2, 8, C], [2, C])
    sliding = (shards[".sliding.values[0]"], shards[".sliding.keys[0]"], shards[".sliding.slot_positions"])
    assert sliding == ([2, 2, 3, 8], [2, 2, 8, 3], [2, 3])
    assert ".keys[1]" not in shards and ".sliding.keys[1]" not in shards
    assert measured["hybrid/2x4"][f"cache_kept/{route}"]


# ---------------------------------------------------------------- mesh strings and the rule (any device count)


@pytest.mark.parametrize(
    "spec, sizes",
    [
        ("data=2,model=4", {"data": 2, "model": 4}),
        ("model=8", {"data": 1, "model": 8}),
        (" data = 3 ", {"data": 3, "model": 1}),
    ],
)
def test_parse_mesh(spec, sizes):
    assert sharding.parse_mesh(spec) == sizes


@pytest.mark.parametrize(
    "spec, message",
    [("data=2,tensor=4", "unknown mesh axis 'tensor'"), ("data=2,data=2", "given twice"), ("model=0", "positive integer"),
     ("model=x", "positive integer"), ("", "names no axis")],
)  # fmt: skip
def test_parse_mesh_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh(spec)


def test_make_mesh_refuses_a_product_that_is_not_the_device_count():
    with pytest.raises(ValueError, match=f"needs {2 * jax.device_count() + 2} devices"):
        sharding.make_mesh({"data": 2, "model": jax.device_count() + 1})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"pipeline": 1})


def test_make_mesh_on_one_device_leaves_everything_whole():
    mesh = sharding.make_mesh("data=1,model=1", devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    assert sharding.logical_sharding(("vocab", "embed"), (96, 8), mesh).spec == P()


@pytest.mark.parametrize(
    "axes, shape, sizes, expected",
    [
        (("embed", "heads", "head_dim"), (64, 16, 8), {"data": 2, "model": 4}, P(None, "model")),
        (("embed", "heads", "head_dim"), (64, 9, 8), {"data": 2, "model": 4}, P()),
        (("batch", "kv_heads", "slots", "head_dim"), (4, 3, 8, 8), {"data": 2, "model": 4}, P("data")),
        (("batch", "kv_heads", "slots", "head_dim"), (1, 4, 8, 8), {"data": 2, "model": 4}, P(None, "model")),
        (("vocab", "embed"), (49152, 576), {"data": 1, "model": 8}, P("model")),
    ],
)  # fmt: skip
def test_logical_partition_splits_only_what_divides(axes, shape, sizes, expected):
    assert sharding.logical_partition(axes, shape, sizes) == expected


def test_logical_partition_refuses_unknown_axes_and_collisions():
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_partition(("experts",), (4,), {"data": 1, "model": 2})
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        sharding.logical_partition(("heads", "mlp"), (4, 4), {"data": 1, "model": 2})


@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_every_family_has_a_rule_for_every_param(family):
    config = ModelConfig(
        family=family, vocab_size=96, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
        intermediate_size=128, norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=64,
    )  # fmt: skip
    specs = families.FAMILIES[family].param_specs(config)
    partitions = jax.tree.map(
        lambda spec: sharding.logical_partition(spec.axes, spec.shape, {"data": 2, "model": 4}),
        specs,
        is_leaf=lambda leaf: isinstance(leaf, ParamSpec),
    )
    assert len(partitions["layers"]) == 2
    assert partitions["layers"][1]["qkv"] == P(None, "model") and partitions["lm_head"] == P(None, "model")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    with open(sys.argv[1], "w") as f:
        json.dump(measure(), f, indent=1)
