"""StreamEval (`experiments.streameval`): the stream generator, answers generated inside the stream by
the library's one generation call, StreamingLLM equal to dense attention while nothing is evicted,
and the experiment's records, on a tiny random Llama with a byte-level tokenizer and a ChatML
template, and end to end on SmolLM2."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
import safetensors.numpy

from support import processes, recall_family, tiny_chat
from support.tiny_chat import cache_stream, rendered_ids

two_end_ids = tiny_chat.two_end_ids  # the shared fixture, under its name
from configs import streameval as streameval_config
from experiments import streameval
from streamjax.files import chat_models
from streamjax.model import families
from streamjax.stream import chat, generation
from support.models import CHATML_TEMPLATE, random_hf_llama, save_byte_tokenizer


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
    return chat_models.load_chat_model(str(root / "model"), template_file=str(root / "template.jinja")), root


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
    # Each run is named by its cache: window attention holds as many slots as StreamingLLM, none of them sinks.
    assert names == ["window-0+124-d2", "window-0+124-d6", "window-0+404-d2", "window-0+404-d6",
                     "streaming-4+120-d2", "streaming-4+120-d6", "streaming-4+400-d2", "streaming-4+400-d6"]  # fmt: skip
    assert [run["cache"] for run in report["runs"]] == [name.split("-")[1] for name in names]
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


def test_a_rerun_keeps_the_runs_its_workdir_finished_and_refuses_another_config(tiny, tmp_path, monkeypatch):
    _, root = tiny
    config = streameval_config.get_config()
    config.update({"model": str(root / "model"), "chat_template": str(root / "template.jinja"),
                   "method": "window,streaming", "window": "120", "num_lines": 12, "query_every": 4,
                   "answer_distance": "2", "num_samples": 1})  # fmt: skip
    first = streameval.run(config, tmp_path)
    (tmp_path / "window-0+124-d2" / "queries.jsonl").unlink()  # a run to redo
    computed = []
    real_run_stream = streameval.run_stream
    monkeypatch.setattr(streameval, "run_stream", lambda *a, **k: computed.append(a[3:5]) or real_run_stream(*a, **k))
    again = streameval.run(config, tmp_path)
    assert computed == [(0, 124)] and again["runs"] == first["runs"]  # only the window run was computed again
    config.num_lines = 16
    with pytest.raises(ValueError, match="holds StreamEval runs of another config .* num_lines"):
        streameval.run(config, tmp_path)


def test_two_processes_over_one_mesh_answer_as_one_process_on_one_device(tiny, tmp_path):
    """2 `jax.distributed` processes, 4 CPU devices each, the model and cache on data=2,model=4: every answer
    equals the single-device run's, and only process 0 wrote the report."""
    _, root = tiny
    fields = {"model": str(root / "model"), "chat_template": str(root / "template.jinja"), "method": "streaming",
              "window": "120", "num_lines": 12, "query_every": 4, "answer_distance": "2", "num_samples": 1,
              "num_sinks": 4}  # fmt: skip
    flags = ["--config=configs/streameval.py", *(f"--config.{key}={value}" for key, value in fields.items())]
    children = processes.start(
        processes.experiment("streameval", [*flags, "--config.mesh=data=2,model=4"], tmp_path / "two")
    )
    config = streameval_config.get_config()
    config.update(fields)
    alone = streameval.run(config, tmp_path / "one")
    results = processes.wait(children, timeout=180)
    processes.assert_succeeded(results)
    run_name = "streaming-4+120-d2"
    queries = [(tmp_path / where / run_name / "queries.jsonl").read_text() for where in ("one", "two")]
    assert queries[0] == queries[1] and queries[0].count("\n") == alone["runs"][0]["queries"] == 3
    assert all(json.loads(line)["generated"] for line in queries[0].splitlines())  # answers of some tokens
    report = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert report["processes"] == 2 and report["runs"] == alone["runs"]
    assert "| run |" in results[0].stdout and "| run |" not in results[1].stdout  # process 0 alone reports


def test_the_worked_example_and_every_answer_close_with_the_template_s_end_of_turn(two_end_ids, monkeypatch):
    """A model that ends every reply with <|endoftext|> (0) where its template closes turns with <|im_end|> (2)."""
    model, real_turn, seen = two_end_ids, chat.chat_turn, []  # (stream in the cache, messages) around each turn

    def recording_turn(model, conversation, message, settings, stops, **kwargs):
        seen.append((cache_stream(conversation.cache), conversation.messages))  # before the cache is donated
        conversation, turn = real_turn(model, conversation, message, settings, stops, **kwargs)
        seen.append((cache_stream(conversation.cache), conversation.messages))
        return conversation, turn

    monkeypatch.setattr(chat, "chat_turn", recording_turn)
    stream = streameval.make_stream(num_lines=8, query_every=4, answer_distance=2, seed=0)
    records = streameval.run_stream(model, stream, 4, num_sinks=4, window=3000, max_tokens=None, sample=0)
    assert len(records) == 2 and all(record["generated"] == "" for record in records)  # each reply: [0]
    (taught, example), (answered, messages) = seen[0], seen[-1]
    assert taught[-1] == 2  # the worked example closed with <|im_end|>, not min(end ids) = 0
    newline = 3 + ord("\n")
    assert rendered_ids(model, example) == taught + [newline]
    assert answered[-1] == 0 and rendered_ids(model, messages) == answered + [2, newline]  # its 0, then the close


@pytest.fixture(scope="module")
def recall(tmp_path_factory):
    """(model directory, template file) of the stand-in that reads exactly what its cache holds
    (`recall_family`, registered for this module's tests)."""
    root = tmp_path_factory.mktemp("recall")
    (root / "model").mkdir()
    hf_config = {"model_type": "recall", "max_position_embeddings": 1 << 16, "eos_token_id": [0, 2]}
    (root / "model" / "config.json").write_text(json.dumps(hf_config))
    identity = np.eye(recall_family.VOCAB_SIZE, dtype=np.float32)
    safetensors.numpy.save_file({"embed.weight": identity}, str(root / "model" / "model.safetensors"))
    save_byte_tokenizer(root / "model", specials_first=True)
    (root / "template.jinja").write_text(CHATML_TEMPLATE)
    families.register(recall_family)
    try:
        yield root / "model", root / "template.jinja"
    finally:
        families.FAMILIES.pop("recall")


def test_a_model_that_reads_its_cache_answers_every_question_and_the_distance_is_exact(recall):
    model = chat_models.load_chat_model(str(recall[0]), template_file=str(recall[1]))
    stream = streameval.make_stream(num_lines=12, query_every=6, answer_distance=2, seed=0)
    records = streameval.run_stream(model, stream, 6, num_sinks=4, window=3000, max_tokens=None, sample=0)
    assert [(r["line"], r["generated"], r["correct"]) for r in records] == [
        (4, str(stream.values[4]), True), (10, str(stream.values[10]), True)
    ]  # fmt: skip
    # One token a byte: from line 4's first byte, "line 4: REGISTER_CONTENT is <vvvvv>" (35) "\n" (1), line 5
    # (35) "\n" (1), "What is the REGISTER_CONTENT in line 4?" (39), then <|im_end|> "\n" <|im_start|> (3) and
    # "assistant\n" (10) before the answer: 124. For line 10, each line and the question one byte longer: 127.
    assert [r["answer_distance_tokens"] for r in records] == [124, 127]


def test_the_benchmark_scores_a_model_that_reads_its_cache_by_what_the_cache_holds(recall, tmp_path):
    """Positive control: the stand-in answers right exactly while the asked line is in its cache."""
    config = streameval_config.get_config()
    config.update({"model": str(recall[0]), "chat_template": str(recall[1]), "method": "window,streaming",
                   "window": "128", "num_lines": 12, "query_every": 6, "answer_distance": "2,5",
                   "num_samples": 1, "num_sinks": 4})  # fmt: skip
    report = streameval.run(config, tmp_path)
    accuracy = {run["name"]: run["accuracy"] for run in report["runs"]}
    assert accuracy == {"window-0+132-d2": 1.0, "window-0+132-d5": 0.0,
                        "streaming-4+128-d2": 0.5, "streaming-4+128-d5": 0.0}  # fmt: skip
    # By hand as above: at 5 lines back, lines 1-5 (35 + 1 bytes each), the question (39) and 13: 232;
    # lines 7-9 (36 each), 10-11 (37 each), the question (39) and 13: 234.
    distances = {2: [124, 127], 5: [232, 234]}
    for run in report["runs"]:
        window = int(run["cache"].split("+")[1])
        records = [json.loads(line) for line in (tmp_path / run["name"] / "queries.jsonl").read_text().splitlines()]
        assert [r["answer_distance_tokens"] for r in records] == distances[run["answer_distance"]]
        # The query at stream position p sees the window's W tokens before it; the answer's last (fifth)
        # digit is predicted 4 tokens after the first, so the line must start at most W - 3 tokens back.
        assert [r["correct"] for r in records] == [r["answer_distance_tokens"] <= window - 3 for r in records]
        # Past that, the answer stops where the line left the window: a prefix of the value, or nothing.
        assert all(str(r["expected"]).startswith(r["generated"]) for r in records)
        assert json.loads((tmp_path / run["name"] / "summary.json").read_text()) == run
    table = (tmp_path / "results.md").read_text()
    assert "| window-0+132-d2 | window | 0+132 | 2 | 2 | 1.000 |" in table
    assert "| streaming-4+128-d5 | streaming | 4+128 | 5 | 2 | 0.000 |" in table


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


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("distributed", "num_processes=2", "distributed='num_processes=2' lacks coordinator, process_id"),
     ("mesh", "data=2,pipeline=2", "unknown mesh axis 'pipeline'")],
)  # fmt: skip
def test_a_bad_mesh_or_distributed_setting_is_refused_before_the_model_is_read(tmp_path, field, value, message):
    config = streameval_config.get_config()
    config.model = str(tmp_path / "no model here")  # reading it would fail otherwise
    config[field] = value
    with pytest.raises(ValueError, match=message):
        streameval.run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
