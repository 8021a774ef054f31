"""StreamEval (`streamjax.streameval`): the stream generator, answers generated inside the stream by
the library's one generation call, StreamingLLM equal to dense attention while nothing is evicted,
and the experiment's records, on a tiny random Llama with a byte-level tokenizer and a ChatML
template, and end to end on SmolLM2."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from conftest import CHATML_TEMPLATE, random_hf_llama, save_byte_tokenizer

from configs import streameval as streameval_config
from streamjax import chat, generation, streameval


def test_the_stream_is_seeded_and_every_answer_is_its_line_s_value():
    stream = streameval.make_stream(num_lines=95, query_every=10, answer_distance=20, seed=3)
    assert stream == streameval.make_stream(95, 10, 20, seed=3) and stream != streameval.make_stream(95, 10, 20, 4)
    assert [q.asked_after for q in stream.queries] == [19, 29, 39, 49, 59, 69, 79, 89]
    seen: dict[int, int] = {}
    for message, lines, query in streameval.turns(stream, query_every=10):
        for index, value in re.findall(r"line (\d+): REGISTER_CONTENT is <(\d+)>", message):
            seen[int(index)] = int(value)
        assert list(seen)[-len(lines) :] == list(lines)  # each turn brings its block of lines, in order
        if query is not None:
            asked = int(re.search(r"in line (\d+)\?$", message).group(1))
            assert asked == query.line == query.asked_after - 19  # 20 lines back, counting the last one
            assert seen[asked] == query.expected  # parsed from the line as it stands in the stream
    assert sorted(seen) == list(range(95))


@pytest.mark.parametrize(
    ("reply", "value"),
    [("38193", 38193), ("The REGISTER_CONTENT in line 17 is <38193>.", 38193), ("line 17: 38193", 38193),
     ("The REGISTER_CONTENT in line 17 is", 17), ("I do not know.", None)],
)  # fmt: skip
def test_an_answer_gives_its_last_number(reply, value):
    assert streameval.answered_value(reply) == value


@pytest.mark.parametrize(
    "shape, message",
    [((20, 10, 0), "answer_distance must be >= 1"), ((20, 0, 5), "query_every must be >= 1"),
     ((20, 10, 20), "must exceed answer_distance")],
)  # fmt: skip
def test_a_stream_that_can_ask_nothing_is_refused(shape, message):
    with pytest.raises(ValueError, match=message):
        streameval.make_stream(*shape, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("streameval")
    model = random_hf_llama(seed=5, vocab_size=260, max_position_embeddings=4096, eos_token_id=257)
    model.save_pretrained(root / "model")
    save_byte_tokenizer(root / "model")
    (root / "template.jinja").write_text(CHATML_TEMPLATE)
    return chat.load_chat_model(str(root / "model"), template_file=str(root / "template.jinja")), root


def test_answers_inside_the_stream_are_the_library_s_generation_from_the_same_cache(tiny, monkeypatch):
    model, _ = tiny
    real_turn, checked = chat.chat_turn, []

    def checking_turn(model, conversation, message, settings, stops, **kwargs):
        copy = jax.tree.map(lambda x: x.copy(), conversation.cache)
        inputs = chat.turn_input(model, conversation, message)
        expected = generation.generate(model.params, copy, [inputs], model.config, settings, stops).tokens[0]
        conversation, turn = real_turn(model, conversation, message, settings, stops, **kwargs)
        checked.append(turn.reply_token_ids == expected.tolist())
        return conversation, turn

    monkeypatch.setattr(chat, "chat_turn", checking_turn)
    stream = streameval.make_stream(num_lines=24, query_every=6, answer_distance=4, seed=0)
    records = streameval.run_stream(model, stream, 6, num_sinks=4, window=300, max_tokens=None, sample=0)
    assert len(records) == 4 and len(checked) == 4 and all(checked)


def test_streaming_answers_equal_dense_while_the_cache_holds_the_stream(tiny):
    model, _ = tiny
    stream = streameval.make_stream(num_lines=30, query_every=10, answer_distance=12, seed=1)
    dense = streameval.run_stream(model, stream, 10, num_sinks=0, window=3000, max_tokens=3000, sample=0)
    streaming = streameval.run_stream(model, stream, 10, num_sinks=4, window=2000, max_tokens=None, sample=0)
    assert len(dense) == len(streaming) == 2 and dense[-1]["stream_position"] < 2000
    assert [r["generated"] for r in streaming] == [r["generated"] for r in dense]
    # The distance in tokens is the line's length times the lines in between, and then some.
    assert all(12 * 30 < r["answer_distance_tokens"] < 12 * 60 for r in dense)


def test_the_experiment_writes_complete_records_and_their_accuracy(tiny, tmp_path):
    _, root = tiny
    config = streameval_config.get_config()
    config.update({"model": str(root / "model"), "chat_template": str(root / "template.jinja"),
                   "method": "window,streaming", "window": "120,400", "num_lines": 20, "query_every": 5,
                   "answer_distance": "2,6", "num_samples": 2, "num_sinks": 4})  # fmt: skip
    report = streameval.run(config, tmp_path)
    names = [run["name"] for run in report["runs"]]
    assert names == ["window-0+120-d2", "window-0+120-d6", "window-0+400-d2", "window-0+400-d6",
                     "streaming-4+120-d2", "streaming-4+120-d6", "streaming-4+400-d2", "streaming-4+400-d6"]  # fmt: skip
    for run in report["runs"]:
        records = [json.loads(line) for line in (tmp_path / run["name"] / "queries.jsonl").read_text().splitlines()]
        fields = {"sample", "line", "asked_after", "stream_position", "answer_distance_tokens", "expected",
                  "generated", "answered", "correct"}  # fmt: skip
        assert all(set(record) == fields for record in records) and {r["sample"] for r in records} == {0, 1}
        assert run["accuracy"] == np.mean([r["correct"] for r in records])
        assert json.loads((tmp_path / run["name"] / "summary.json").read_text()) == run
    assert (tmp_path / "results.md").read_text().count("\n") == 2 + 8
    for name in ("accuracy_vs_position.png", "accuracy_vs_distance.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "field, value, message",
    [("answer_distance", "0", "answer_distance must be >= 1"), ("query_every", 0, "query_every must be >= 1"),
     ("num_lines", 20, "must exceed answer_distance"), ("window", "12", "too small to hold one line"),
     ("method", "dense,recall", "choose from")],
)  # fmt: skip
def test_bad_input_is_refused_before_anything_runs(tiny, tmp_path, field, value, message):
    _, root = tiny
    config = streameval_config.get_config()
    config.update({"model": str(root / "model"), "chat_template": str(root / "template.jinja"), field: value})
    with pytest.raises(ValueError, match=message):
        streameval.run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.real_assets
def test_smollm2_answers_a_few_questions_inside_the_stream(smollm2_gguf, tmp_path):
    config = streameval_config.get_config()
    config.update({"model": str(smollm2_gguf), "method": "streaming", "window": "252", "num_lines": 40,
                   "answer_distance": "5", "num_samples": 1})  # fmt: skip
    run = streameval.run(config, tmp_path)["runs"][0]
    records = [json.loads(line) for line in (tmp_path / run["name"] / "queries.jsonl").read_text().splitlines()]
    assert run["queries"] == len(records) == 4 and run["accuracy"] == np.mean([r["correct"] for r in records])
    assert records[-1]["stream_position"] > 256  # the stream has outgrown the 4 + 252 cache
    assert all(r["correct"] == (streameval.answered_value(r["generated"]) == r["expected"]) for r in records)
