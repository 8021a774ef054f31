"""The server's load test (`experiments.serve_load`) end to end on a tiny random Llama with a word-level
tokenizer: a real server child process on loopback, tiny numbers (2 turns, long sessions of 3)."""

from __future__ import annotations

import json
import statistics

import pytest

from configs import serve_load as serve_load_config
from experiments import serve_load
from streamjax.runs import provenance
from support import tiny_chat

tiny = tiny_chat.tiny  # the shared fixture, under its name

# Sentences of words the tiny tokenizer knows ("." is its unknown token): 2 per turn, no two turns alike.
SENTENCES = [f"w{5 + k % 80} w{6 + (k * 7) % 80} w{7 + (k * 3) % 80}." for k in range(200)]


def tiny_config(tiny, tmp_path, **overrides):
    model_dir, template = tiny
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(SENTENCES))
    config = serve_load_config.get_config()
    config.update(
        model=str(model_dir), chat_template=str(template), num_sinks=2, window=30, corpus=str(corpus),
        turns=2, max_tokens=6, long_turns=3, long_max_tokens=5, block_size=4, peer_rounds=1,
    )  # fmt: skip
    config.update(overrides)
    return config


def test_a_run_measures_every_phase_and_its_numbers_agree(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path)
    serve_load.run(config, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "serve_load.json").read_text())

    assert set(results["concurrency"]) == {"1", "4", "8"}
    for count, phase in results["concurrency"].items():
        records = [record for session in phase["records"] for record in session]
        assert phase["sessions"] == int(count) and phase["turns"] == int(count) * 2 == len(records)
        assert phase["completion_tokens"] == sum(record["usage"]["completion_tokens"] for record in records)
        assert phase["aggregate_tokens_per_s"] == pytest.approx(phase["completion_tokens"] / phase["wall_s"])
        assert phase["session_status"] == {"new": int(count), "continued": int(count)}
        for record in records:
            usage = record["usage"]
            assert 1 <= usage["completion_tokens"] <= config.max_tokens
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert 0 < record["time_to_first_token_s"] <= record["latency_s"]
        first = [record["time_to_first_token_s"] for record in records]
        assert (
            min(first) <= phase["time_to_first_token_s"]["p50"] <= phase["time_to_first_token_s"]["p95"] <= max(first)
        )

    long = results["long"]
    for session in long["records"]:
        fed = [record["usage"]["prompt_tokens"] + record["usage"]["completion_tokens"] for record in session]
        assert [record["stream_tokens"] for record in session] == [sum(fed[: k + 1]) for k in range(3)]
    assert set(long["at_turn"]) == {"2", "3"}
    assert long["at_turn"]["3"]["stream_tokens"] == [session[2]["stream_tokens"] for session in long["records"]]
    assert long["cache_tokens"] == 32
    rates = [record["decode_tokens_per_s"] for session in long["records"] for record in session[1:3]]
    rates = [rate for rate in rates if rate is not None]  # None: a one-token reply
    assert set(long["windows"]) == {"2-3"}  # 3 turns: the first and the last window are turns 2 and 3
    assert long["windows"]["2-3"]["decode_tokens_per_s_median"] == pytest.approx(statistics.median(rates))

    # Every client-side usage adds up to the server's own counter.
    assert results["totals"]["client_completion_tokens"] == results["totals"]["server_completion_tokens_total"]

    memory = results["memory"]
    assert memory["server_exit_code"] == 0
    names = {f"chat-{n}-{k}" for n in (1, 4, 8) for k in range(n)} | {"long-0", "long-1"}
    assert set(memory["session_files"]) == names  # saved when evicted or at the graceful stop
    # random_hf_llama: 2 layers, 2 kv heads, head dim 48 / 6 = 8; float32; 2 + 30 tokens.
    assert memory["slot_cache"]["keys_values_bytes"] == 2 * 2 * 2 * 8 * 32 * 4
    assert memory["slot_cache"]["all_arrays_bytes"] > memory["slot_cache"]["keys_values_bytes"]

    baseline = results["one_slot_baseline"]
    assert baseline["sessions"] == 1 and baseline["turns"] == 2
    efficiency = json.loads((provenance.REPOSITORY / config.efficiency_json).read_text())
    check = results["check"]
    assert check["target"] == efficiency["generation"]["batch_speedup"]
    ratio = (
        results["concurrency"]["8"]["aggregate_tokens_per_s"] / results["concurrency"]["1"]["aggregate_tokens_per_s"]
    )
    assert check["measured"] == pytest.approx(ratio) and check["met"] == (ratio >= check["target"])

    peer = results["peer"]
    assert peer["library"] == "transformers" and peer["new_tokens"] == config.max_tokens
    assert peer["time_to_first_token_s"] > 0 and peer["decode_tokens_per_s"] > 0
    assert results["prompts"]["first"] == " ".join(SENTENCES[2:4])  # the warmup spoke the first two sentences
    table = (tmp_path / "run" / "results.md").read_text()
    assert f"| 8 (slots 8) | 16 | {results['concurrency']['8']['completion_tokens']} |" in table


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"concurrency": (1, 8, 9)}, "concurrency must be distinct session counts in \\[1, slots=8\\]"),
        ({"concurrency": (1, 4)}, "must include 1 and 8"),
        ({"long_turns": 1}, "long_turns must be an int >= 2"),
        ({"long_sessions": 9}, "long_sessions must be <= slots=8"),
        ({"max_tokens": 0}, "max_tokens must be an int >= 1"),
        ({"long_max_tokens": -1}, "long_max_tokens must be an int >= 1"),
        ({"dtype": "float64"}, "unknown dtype"),
        ({"sentences_per_turn": 50}, "the corpus has 200 sentences"),
    ],
)
def test_bad_config_is_refused_before_the_server_starts(tiny, tmp_path, overrides, message):
    config = tiny_config(tiny, tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        serve_load.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_unknown_field_is_refused(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path)
    config.unknown_field = 1
    with pytest.raises(ValueError, match=r"unknown: \['unknown_field'\]"):
        serve_load.run(config, tmp_path / "run")
