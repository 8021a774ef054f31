"""The efficiency benchmark: cache states it sets, its byte and FLOP accounting, and an end-to-end run.

No timing is asserted (the machine may be shared); the numbers are checked only for shape and sense.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import streamjax
from configs import efficiency as efficiency_config
from experiments import efficiency
from streamjax.model import costs, families
from streamjax.model.config import ModelConfig
from streamjax.model.params import init_params
from support.family_models import hf_model

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ModelConfig(
    family="llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=48, norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=512,
)  # fmt: skip
BOOKKEEPING = ("slot_positions", "length", "cursor", "next_position")


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(families.param_specs(TINY), jax.random.key(0))


@pytest.mark.parametrize(
    "num_sinks, window, num_seen",
    [
        (4, 12, 0),
        (4, 12, 3),
        (4, 12, 4),
        (4, 12, 10),
        (4, 12, 16),
        (4, 12, 17),
        (4, 12, 45),
        (0, 16, 100),
        (1, 8, 1003),
    ],
)
def test_filled_cache_is_the_state_streaming_leaves(tiny_params, num_sinks, window, num_seen):
    expected = streamjax.init_cache(TINY, 2, num_sinks, window)
    if num_seen:
        tokens = np.random.RandomState(num_seen).randint(0, TINY.vocab_size, size=(2, num_seen))
        _, expected = streamjax.prefill(tiny_params, expected, tokens, TINY, chunk_size=64)
    cache = efficiency.filled_cache(TINY, num_sinks, window, num_seen, batch_size=2)
    for field in BOOKKEEPING:
        np.testing.assert_array_equal(getattr(cache, field), getattr(expected, field), err_msg=field)


@pytest.mark.parametrize("num_seen", [3, 9, 40])
def test_filled_cache_of_a_hybrid_model_is_the_state_streaming_leaves(tiny_params, num_seen):
    """Layer 0 slides over 6 keys (a ring of 5), layer 1 keeps 2 sinks + 7: both parts' bookkeeping."""
    hybrid = dataclasses.replace(TINY, layer_types=("sliding_attention", "full_attention"), sliding_window=6)
    tokens = np.random.RandomState(num_seen).randint(0, TINY.vocab_size, size=(2, num_seen))
    _, expected = streamjax.prefill(tiny_params, streamjax.init_cache(hybrid, 2, 2, 7), tokens, hybrid, chunk_size=8)
    cache = efficiency.filled_cache(hybrid, 2, 7, num_seen, batch_size=2)
    for part, expected_part in ((cache, expected), (cache.sliding, expected.sliding)):
        for field in BOOKKEEPING:
            np.testing.assert_array_equal(getattr(part, field), getattr(expected_part, field), err_msg=field)


def test_filled_cache_positions_wrap_like_the_stream_counter():
    cache = efficiency.filled_cache(TINY, 2, 3, 2**32 + 10)
    assert cache.next_position.tolist() == [10]
    # 2**32 + 8 ring tokens, a multiple of the window 3: the ring holds ...7, 8, 9 in order, cursor 0.
    assert cache.slot_positions.tolist() == [[0, 1, 7, 8, 9]]
    assert cache.cursor.tolist() == [0]


def test_byte_and_flop_accounting_by_hand(tiny_params):
    D, F, L, N, K, H, V = 32, 48, 2, 4, 2, 8, 50
    layer_matrices = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    norms = L * 2 * D + D
    assert costs.matmul_params(tiny_params, TINY) == layer_matrices + D * V
    # Untied: the head [D, V] is read, the embedding only for its one row.
    assert costs.param_bytes_per_token(tiny_params, TINY) == 4 * (layer_matrices + norms + D * V + D)
    assert costs.cache_bytes(TINY, 100, np.float32) == 2 * L * 100 * K * H * 4
    attention = 4 * L * N * H * 37
    assert costs.flops_per_token(tiny_params, TINY, keys_per_query=37) == 2 * (layer_matrices + D * V) + attention


def test_byte_and_flop_accounting_of_a_hybrid_cache_by_hand(tiny_params):
    """Layer 0 slides over 6 keys (its ring: 5 slots whatever the cache size), layer 1 is full attention."""
    hybrid = dataclasses.replace(TINY, layer_types=("sliding_attention", "full_attention"), sliding_window=6)
    D, F, N, K, H, V = 32, 48, 4, 2, 8, 50
    assert costs.cache_bytes(hybrid, 100, np.float32) == 2 * (5 + 100) * K * H * 4
    assert costs.cache_bytes(hybrid, 100, np.float32, sliding_capacity=3) == 2 * (3 + 100) * K * H * 4
    cache = streamjax.init_cache(hybrid, 1, 4, 96)  # the same count from the arrays a decode step reads
    assert costs.cache_bytes(hybrid, 100, np.float32) == sum(leaf.nbytes for leaf in cache.keys + cache.values) + sum(
        leaf.nbytes for leaf in cache.sliding.keys + cache.sliding.values
    )
    matrices = 2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * V
    assert costs.flops_per_token(tiny_params, hybrid, 101, sliding_keys_per_query=6) == 2 * matrices + 4 * N * H * (
        101 + 6
    )
    # Without a cache every layer computes every key of the chunk (the sliding layer masks the far ones).
    assert costs.flops_per_token(tiny_params, hybrid, 37) == 2 * matrices + 4 * N * H * 2 * 37


def test_targets_compare_each_value_with_its_bound():
    config = efficiency_config.get_config("small=True")

    def rows(seconds):
        fractions = {"adjacent_bandwidth_fraction": 0.6, "bandwidth_fraction": 0.4}
        return [{"cache_size": 64, "timing": {"median_s": seconds}, **fractions}]

    results = {
        "routes": {"speedup": 12.0},
        "decode": {"cache_sizes": [64], "methods": {"streaming": rows(1.0), "recompute": rows(19.0)}},
        "generation": {"over_step": 1.04, "batch_speedup": 3.9},
        "long_stream": {
            "late_over_early": 1.12,
            "memory_peak_ratio": 1.0,
            "generation": {"late_over_early": 0.95, "memory_peak_ratio": 1.06},
        },
    }
    met = [target["met"] for target in efficiency.targets(results, config)]
    assert met == [True, False, False, True, True, False, True, False]  # no bandwidth target: 32 is not measured
    config.target_cache_size = 64  # both bandwidth fractions, each against 0.5
    assert [target["met"] for target in efficiency.targets(results, config)][-2:] == [True, False]


@pytest.mark.parametrize("compare", [40, 65])  # within cache + one chunk (4 + 28 + 16 = 48); beyond the chunk route
def test_route_comparison_must_reach_past_the_cache_and_several_chunks(compare):
    config = efficiency_config.get_config("small=True")
    config.route_compare_tokens = compare
    with pytest.raises(ValueError, match="route_compare_tokens"):
        efficiency.check_route_config(config)


@pytest.mark.parametrize("config_file", ["configs/efficiency.py", "configs/efficiency_gemma3.py"])
def test_small_config_runs_end_to_end(tmp_path, config_file):
    """A 2-layer Llama, and a hybrid Gemma 3 (5 layers sliding over 8 keys, 1 full) whose 64 compared
    predictions go past its 32-slot full cache and its 7-slot sliding rings."""
    command = [
        sys.executable, "-m", "experiments.efficiency", f"--config={config_file}:small=True",
        f"--workdir={tmp_path}", "--config.cache_sizes=(16,32)", "--config.methods=streaming,recompute,dense",
    ]  # fmt: skip
    completed = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "efficiency.json").read_text())
    # Bytes per decoded token: all params (tied embeddings) and each layer's keys and values, float32: K = 2 heads
    # of 16 and 2 full layers (Llama); K = 1 head of 16, 5 sliding layers of 7 slots and 1 full (Gemma 3).
    slot_bytes, sliding_slots, full_layers = (2 * 16, 5 * 7, 1) if "gemma3" in config_file else (2 * 2 * 16, 0, 2)
    for row in results["decode"]["methods"]["streaming"]:
        cache_bytes = 4 * slot_bytes * (sliding_slots + full_layers * row["cache_size"])
        assert row["bytes_per_token"] == results["meta"]["param_bytes"] + cache_bytes
    assert list(results) == ["meta", "machine", "decode", "routes", "generation", "long_stream", "targets"]
    assert set(results["machine"]["bandwidth"]) == {"reduce", "copy", "matvec", "best_bytes_per_s"}
    assert set(results["machine"]["matmul"]) == {"float32", "bfloat16"}
    assert set(results["decode"]["methods"]) == {"streaming", "recompute", "dense"}
    for rows in results["decode"]["methods"].values():
        assert [row["cache_size"] for row in rows] == [16, 32]
        assert all(row["timing"]["median_s"] > 0 and row["memory"]["compiled"]["peak_bytes"] > 0 for row in rows)
    assert all(0 < row["bandwidth_fraction"] for row in results["decode"]["methods"]["streaming"])
    assert all(row["memory"]["minor_page_faults_per_token"] >= 0 for row in results["decode"]["methods"]["dense"])
    routes = results["routes"]
    assert routes["token"]["num_predictions"] == 32 and routes["chunk"]["num_predictions"] == 64
    assert routes["compared_predictions"] == 64  # past the 32-slot cache, over four chunks of 16
    assert routes["max_abs_nll_difference"] < 2.9e-6 and routes["max_abs_nll_difference_past_cache"] < 2.9e-6  # 9.5e-7
    assert {"100", "1000", "3000", "late_over_early", "memory_peak_ratio"} <= set(results["long_stream"])
    assert results["long_stream"]["state"].startswith("streamed")
    assert results["meta"]["made_by"].startswith(f"python -m experiments.efficiency --config={config_file}")
    generation = results["generation"]
    assert generation["block_steps"] == 8 and len(generation["batch_8"]["per_step_s"]) == 2
    assert generation["over_step"] > 0 and generation["batch_speedup"] > 0
    assert generation["weight_matmuls"]["batch_8_s"] > 0 and generation["weight_matmuls"]["ratio"] > 0
    assert {"100", "3000", "late_over_early", "memory_peak_ratio"} <= set(results["long_stream"]["generation"])
    assert len(results["targets"]) == 10 and all(isinstance(target["met"], bool) for target in results["targets"])
    for name in ("latency_vs_cache.png", "memory_vs_cache.png", "route_throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transformers_peer_generates_with_the_models_sliding_cache(tmp_path):
    """transformers' own generation of a tiny Gemma 3 checkpoint (layers 0, 1, 3 slide over 8 keys, layer 2 is
    full): its sliding layers end holding 7 tokens, the full one the prompt and all but the last new token."""
    hf_model("gemma3_mqa_tied_bias_window_8").save_pretrained(tmp_path)
    config = efficiency_config.get_config("small=True")
    config.model, config.transformers_peer, config.peer_new_tokens, config.peer_rounds = str(tmp_path), True, 5, 2
    efficiency.check_peer_config(config)
    peer = efficiency.transformers_peer(config, streamjax_per_token_s=0.5)
    prompt = config.num_sinks + config.route_window
    assert peer["prompt_tokens"] == prompt == 32
    assert peer["cache"] == {
        "type": "DynamicCache",
        "layers": [
            {"type": "DynamicSlidingWindowLayer", "tokens": 7},
            {"type": "DynamicSlidingWindowLayer", "tokens": 7},
            {"type": "DynamicLayer", "tokens": prompt + 4},
            {"type": "DynamicSlidingWindowLayer", "tokens": 7},
        ],
    }
    assert len(peer["per_token_s"]) == 2 * 4 and len(peer["prompt_s"]) == 2  # 4 gaps between 5 tokens, 2 rounds
    assert peer["median_per_token_s"] == np.median(peer["per_token_s"]) > 0
    assert peer["transformers_over_streamjax"] == peer["median_per_token_s"] / 0.5


@pytest.mark.parametrize(
    "change, message",
    [({"model": "random"}, "needs a model file"), ({"model": "gemma3", "peer_new_tokens": 1}, "peer_new_tokens")],
)
def test_peer_config_is_checked_before_anything_runs(change, message):
    config = efficiency_config.get_config("small=True")
    config.transformers_peer = True
    config.update(change)
    with pytest.raises(ValueError, match=message):
        efficiency.check_peer_config(config)
