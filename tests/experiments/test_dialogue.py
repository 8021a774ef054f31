"""The streaming dialogue experiment (`experiments.dialogue`): its script, its token stream, and a run on a
tiny random Llama with a word-level tokenizer (the chat template of `test_chat`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import dialogue as dialogue_config
from experiments import dialogue
from streamjax.files import chat_models
from streamjax.stream import perplexity
from support import tiny_chat
from support.tiny_chat import rendered_ids

tiny, two_end_ids = tiny_chat.tiny, tiny_chat.two_end_ids  # the shared fixtures, under their names

TEXT = "\n\n".join(
    ["CHAPTER I", "w5 w6 w7.", "w8 w9.", "Chapter 2", "w10 w11 w12. w13 w14. w15 w16.", "w17.", "w18 w19.", "w20."]
)


def test_script_turns_pair_consecutive_paragraphs_and_cut_long_ones():
    turns = dialogue.script_turns(TEXT, num_turns=3, max_chars=12)
    assert turns == [("w5 w6 w7.", "w8 w9."), ("w10 w11 w12.", "w17."), ("w18 w19.", "w20.")]  # headings skipped
    with pytest.raises(ValueError, match="8 are needed for 4 turns"):
        dialogue.script_turns(TEXT, num_turns=4, max_chars=12)


def test_the_stream_is_what_the_chat_program_feeds_with_the_references_as_replies(tiny):
    model = chat_models.load_chat_model(str(tiny[0]), template_file=str(tiny[1]))
    turns = [("w5 w6", "w7 w8 w9"), ("w10", "w11"), ("w12 w13", "w14")]
    stream = dialogue.dialogue_stream(model, turns)
    expected = [90, 92, 5, 6, 2, 90, 93, 7, 8, 9, 2, 90, 92, 10, 2, 90, 93, 11, 2, 90, 92, 12, 13, 2, 90, 93, 14, 2]
    assert stream.tokens.tolist() == expected
    assert stream.inputs == [(0, 7), (11, 17), (19, 26)] and stream.replies == [(7, 11), (17, 19), (26, 28)]
    nll = np.arange(len(expected) - 1, dtype=np.float32)  # nll[i] predicts token i + 1
    assert dialogue.reply_nll(nll, stream) == [np.mean([6, 7, 8, 9]), np.mean([16, 17]), np.mean([25, 26])]
    assert dialogue.reply_nll(nll[:20], stream)[2] is None


def test_each_reference_reply_is_closed_with_the_template_s_end_of_turn(two_end_ids):
    turns = [("Hi", "Hello."), ("How are you?", "Well.")]
    stream = dialogue.dialogue_stream(two_end_ids, turns)
    replies = [stream.tokens[start:stop].tolist() for start, stop in stream.replies]
    assert [reply[-1] for reply in replies] == [2, 2] and 0 not in stream.tokens  # <|im_end|>, not min({0, 2})
    messages = [{"role": role, "content": text} for turn in turns for role, text in zip(("user", "assistant"), turn)]
    newline = 3 + ord("\n")
    assert rendered_ids(two_end_ids, messages) == stream.tokens.tolist() + [newline]  # the template's own stream


def test_a_run_writes_its_tables_and_streaming_equals_dense_while_nothing_is_evicted(tiny, tmp_path):
    (tmp_path / "text.txt").write_text("\n\n".join(f"w{3 + i % 80} w{4 + i % 70} w{5 + i % 60}" for i in range(40)))
    config = dialogue_config.get_config()
    config.update({
        "model": str(tiny[0]), "chat_template": str(tiny[1]), "data": str(tmp_path / "text.txt"), "num_turns": 12,
        "num_sinks": 2, "window": 30, "chunk_size": 16, "sample_turns": (1, 6, 11), "sample_tokens": 5,
        "dense_max_tokens": 60,
    })  # fmt: skip
    summary = dialogue.run(config, tmp_path / "out")
    assert set(summary["methods"]) == {"streaming", "window", "dense"} and summary["num_tokens"] > 3 * 32
    caches = {method: result["cache"] for method, result in summary["methods"].items()}
    assert caches == {"streaming": "2+30", "window": "0+32", "dense": "all"}  # each by the cache it holds
    dense = summary["methods"]["dense"]
    assert dense["num_tokens"] == 60 and [s["turn"] for s in dense["samples"]] == [1]  # turn 6 lies past 60 tokens
    for method in ("streaming", "window"):
        samples = summary["methods"][method]["samples"]
        assert [s["turn"] for s in samples] == [1, 6, 11] and all(s["decode_ms_per_token"] > 0 for s in samples)
    early = [turn for turn in summary["turns"] if turn["reply_start"] < 20]  # within the 32-slot caches
    difference = max(abs(t[f"{method}_nll"] - t["dense_nll"]) for t in early for method in ("streaming", "window"))
    print(f"largest difference of a reply's mean NLL to dense attention before any eviction: {difference:.1e}")
    assert early and difference < 1.5e-6  # measured 4.8e-7
    saved = json.loads((tmp_path / "out" / "dialogue.json").read_text())
    assert saved["turns"] == summary["turns"]
    assert "| turns |" in (tmp_path / "out" / "results.md").read_text()
    assert "### Turn 6" in (tmp_path / "out" / "replies.md").read_text()
    for name in ("reply_ppl.png", "decode.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config_is_refused_before_loading(tmp_path):
    config = dialogue_config.get_config()
    for field, value, message in [("method", "dense,sliding", "choose from"), ("sample_turns", (400,), "sample_turns"),
                                  ("window", 0, "window must be >= 1")]:  # fmt: skip
        bad = config.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ValueError, match=message):
            dialogue.run(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert perplexity.METHODS  # the methods are evaluation's


def test_the_plots_of_a_dialogue_shorter_than_the_smoothing_window(tmp_path):
    """Fewer turns than `SMOOTHING_TURNS` (6 here) still plot: the mean runs over the turns there are."""
    turns = [
        {"reply_start": 40 * t, "streaming_nll": 2.0 + t / 10, "dense_nll": None if t == 3 else 2.0} for t in range(6)
    ]
    sample = {"position": 100, "decode_ms_per_token": 1.5, "resident_bytes": 2**30}
    summary = {
        "turns": turns,
        "methods": {method: {"cache": "4+28", "samples": [sample]} for method in ("streaming", "dense")},
        "capacity": 32,
        "config": {"model": "tiny"},
        "made_by": "a test",
    }
    dialogue.plot(summary, tmp_path)
    assert (tmp_path / "reply_ppl.png").stat().st_size > 0 and (tmp_path / "decode.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("distributed", "num_processes=2", "distributed='num_processes=2' lacks coordinator, process_id"),
     ("mesh", "data=2,pipeline=2", "unknown mesh axis 'pipeline'")],
)  # fmt: skip
def test_a_bad_mesh_or_distributed_setting_is_refused_before_the_model_is_read(tmp_path, field, value, message):
    config = dialogue_config.get_config()
    config.model = str(tmp_path / "no model here")  # reading it would fail otherwise
    config[field] = value
    with pytest.raises(ValueError, match=message):
        dialogue.run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
