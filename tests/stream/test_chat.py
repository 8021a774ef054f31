"""The chat program (`streamjax.stream.chat`, `experiments.chat`): scripted and typed conversations on a tiny
random Llama with a word-level tokenizer and a hand-written chat template, and on SmolLM2 past its cache.

The transcript must account for the cache exactly: the concatenation, over turns, of each turn's
`input_token_ids` and `reply_token_ids` is the stream, and the cache holds its sinks and its last W
tokens at their stream positions.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import chat as chat_config
from experiments import chat as chat_program
from streamjax.files import chat_models, sessions
from streamjax.model.transformer import jitted_forward
from streamjax.stream import chat, generation, sampling, stopping
from support import processes, tiny_chat
from support.tiny_chat import REPO, cache_stream, rendered_ids

tiny, two_end_ids = tiny_chat.tiny, tiny_chat.two_end_ids  # the shared fixtures, under their names


def tiny_config(tiny, **overrides):
    config = chat_config.get_config()
    config.model, config.chat_template = str(tiny[0]), str(tiny[1])
    config.num_sinks, config.window, config.max_new_tokens, config.chunk_size, config.block_size = 2, 14, 6, 8, 4
    config.temperature = 0.0
    config.update(overrides)
    return config


def script(path: pathlib.Path, turns: list[str]) -> str:
    path.write_text("\n".join(turns) + "\n")
    return str(path)


def assert_transcript_is_the_cache(records: list[dict], cache) -> None:
    """The stream the transcript describes is the stream the cache holds."""
    stream = [token for record in records for token in record["input_token_ids"] + record["reply_token_ids"]]
    assert records[-1]["stream_position"] == len(stream) == int(cache.next_position[0])
    positions = np.asarray(cache.slot_positions[0])[: int(cache.length[0])].tolist()
    kept = sorted(
        set(range(min(cache.num_sinks, len(stream)))) | set(range(max(0, len(stream) - cache.window), len(stream)))
    )
    assert sorted(positions) == kept  # the sinks and the last W tokens
    held = np.asarray(cache.slot_tokens[0])[: int(cache.length[0])].tolist()
    assert held == [stream[position] for position in positions]


def test_a_scripted_chat_writes_a_transcript_that_accounts_for_the_cache(tiny, tmp_path):
    turns = ["w5 w6 w7", "w8", "w9 w10 w11 w12", "w13 w14", "w15"]
    config = tiny_config(tiny, script=script(tmp_path / "turns.txt", turns))
    conversation, returned = chat_program.run(config, tmp_path / "out", write=lambda text: None)
    records = [json.loads(line) for line in (tmp_path / "out" / "transcript.jsonl").read_text().splitlines()]
    assert [record["turn"] for record in records] == [1, 2, 3, 4, 5] and [r["user"] for r in records] == turns
    assert records == [turn.record() for turn in returned]
    assert records[-1]["stream_position"] > 3 * (2 + 14)  # far past the 16-slot cache
    for record in records:
        assert record["cache_fill"] <= 16 and 1 <= len(record["reply_token_ids"]) <= 6
        assert record["finish_reason"] in ("end_id", "max_new_tokens")
        assert record["prefill_tokens_per_second"] > 0 and record["decode_seconds"] > 0
    # Turn 1 feeds the whole rendering; later turns start by closing the previous reply as the template does.
    assert records[0]["input_token_ids"] == [90, 92, 5, 6, 7, 2, 90, 93]
    after_end = records[0]["finish_reason"] == "end_id"
    assert records[1]["input_token_ids"] == ([] if after_end else [2]) + [90, 92, 8, 2, 90, 93]
    assert_transcript_is_the_cache(records, conversation.cache)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["turns"] == 5 and summary["tokens_generated"] == sum(len(r["reply_token_ids"]) for r in records)


def test_the_text_shown_as_it_streams_is_the_reply_without_its_end_id(tiny):
    config = tiny_config(tiny)
    model = chat_models.load_chat_model(config.model, template_file=config.chat_template)
    shown: list[str] = []
    printer = chat._TextPrinter(model.tokenizer, shown.append, hidden_ids=model.end_ids)
    printer([np.array([5, 6])])
    printer([np.array([7, 2])])  # the reply ends with the end id 2
    assert "".join(shown) == model.tokenizer.decode([5, 6, 7]) and len(shown) == 2


def test_typed_commands_reset_report_and_quit(tiny, tmp_path):
    written: list[str] = []
    lines = ["w5 w6", "/stats", "/reset", "w7", "/quit", "w8"]
    conversation, turns = chat_program.run(tiny_config(tiny), tmp_path, lines=lines, write=written.append)
    assert [turn.user for turn in turns] == ["w5 w6", "w7"]  # "/quit" ended it before "w8"
    text = "".join(written)
    assert "cache " in text and "/16 slots (2 sinks + 14 window)" in text and "stream position" in text
    assert "(a new conversation)" in text
    second = turns[1]  # after /reset the stream starts again
    assert second.stream_position == len(second.input_token_ids) + len(second.reply_token_ids)
    assert second.input_token_ids == [90, 92, 7, 2, 90, 93]
    assert_transcript_is_the_cache([turns[1].record()], conversation.cache)


def test_each_turn_feeds_only_what_it_adds_and_generation_is_the_library_call(tiny, tmp_path):
    """Turn 2 of the chat equals generating from the same cache state with `generation.generate`."""
    config = tiny_config(tiny)
    model = chat_models.load_chat_model(config.model, template_file=config.chat_template)
    stops = stopping.stop_conditions(1, end_ids=model.end_ids, max_new_tokens=6)
    conversation = chat.new_conversation(model, 2, 14)
    conversation, first = chat.chat_turn(model, conversation, "w5 w6", chat.turn_settings(config, 0), stops)
    inputs = chat.turn_input(model, conversation, "w9")
    copy = jax.tree.map(lambda x: x.copy(), conversation.cache)
    expected = generation.generate(model.params, copy, [inputs], model.config, chat.turn_settings(config, 1), stops)
    conversation, second = chat.chat_turn(model, conversation, "w9", chat.turn_settings(config, 1), stops)
    assert second.input_token_ids == inputs and second.reply_token_ids == expected.tokens[0].tolist()
    assert model.end_ids == frozenset({2})


def test_a_reply_that_stops_on_another_end_id_is_closed_with_the_template_s(two_end_ids):
    model = two_end_ids
    assert model.end_ids == frozenset({0, 2}) and chat.end_of_turn_id(model) == 2  # <|im_end|>, not min 0
    stops = stopping.stop_conditions(1, end_ids=model.end_ids, max_new_tokens=6)
    greedy = sampling.sampling_settings(1, temperature=0.0)
    conversation = chat.new_conversation(model, 4, 400)
    conversation, first = chat.chat_turn(model, conversation, "Hi", greedy, stops)
    conversation, second = chat.chat_turn(model, conversation, "Again", greedy, stops)
    for turn in (first, second):
        assert turn.reply_token_ids == [0] and turn.finish_reason == "end_id" and turn.reply == ""
    im_end, newline, im_start = 2, 3 + ord("\n"), 1
    assert second.input_token_ids[:3] == [im_end, newline, im_start]  # turn 1 closed after its <|endoftext|>
    stream = cache_stream(conversation.cache)
    assert stream == first.input_token_ids + [0] + second.input_token_ids + [0]
    # The cache holds what the template renders of the conversation, up to the last turn's close.
    assert rendered_ids(model, conversation.messages) == stream + [im_end, newline]


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown role", "role 'robot'"),
        ("assistant turn in a script", "a script holds user turns"),
        ("no chat template", "has no chat template"),
        ("max_new_tokens below -1", "max_new_tokens must be an int >= 0, or -1"),
        ("transcript already there", "holds an earlier chat"),
        ("window < 1", "window must be >= 1"),
        ("bad session name", "config.session: bad session name '../chat'"),
        ("bad distributed", "distributed='num_processes=2' lacks coordinator, process_id"),
    ],
)
def test_bad_input_is_refused_before_compiling_and_writes_nothing(tiny, tmp_path, case, message):
    records = [
        {"role": "user", "content": "w5"},
        {"role": "robot" if case == "unknown role" else "user", "content": "w6"},
    ]
    if case == "assistant turn in a script":
        records[1]["role"] = "assistant"
    (tmp_path / "turns.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    overrides = {"script": str(tmp_path / "turns.jsonl")}
    if case == "no chat template":
        overrides["chat_template"] = ""
    elif case == "max_new_tokens below -1":
        overrides["max_new_tokens"] = -2
    elif case == "window < 1":
        overrides["window"] = 0
    elif case == "bad session name":
        overrides["session"] = "../chat"
    elif case == "bad distributed":
        overrides["distributed"] = "num_processes=2"
    out = tmp_path / "out"
    if case == "transcript already there":
        out.mkdir()
        (out / "transcript.jsonl").write_text("{}\n")
    compiled = jitted_forward._cache_size(), generation._decode_block._cache_size()
    with pytest.raises(ValueError, match=message):
        chat_program.run(tiny_config(tiny, **overrides), out, write=lambda text: None)
    assert (jitted_forward._cache_size(), generation._decode_block._cache_size()) == compiled
    assert not (out / "summary.json").exists()
    assert case == "transcript already there" or not out.exists()


def assert_same_cache(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # float32: equal values, equal bits


def test_typed_save_and_load_go_back_to_a_saved_conversation(tiny, tmp_path):
    """/load of a conversation saved after turn 1 makes the next turn repeat turn 2 exactly (seeded sampling:
    the seed follows the loaded conversation's turns); bad names and missing sessions only print a message."""
    written: list[str] = []
    lines = ["w5 w6", "/save first", "w7 w8", "/load first", "w7 w8", "/save ../x", "/load absent", "/save", "w9"]
    config = tiny_config(tiny, temperature=0.9, seed=3)
    conversation, turns = chat_program.run(config, tmp_path, lines=lines, write=written.append)
    text = "".join(written)
    path = tmp_path / "sessions" / "first.session.safetensors"
    assert f"(saved to {path})" in text and f"(loaded {path}: 1 turns, stream position" in text
    assert "(not saved: bad session name '../x'" in text and "(not saved: bad session name ''" in text
    assert "(not loaded: no saved session at" in text
    assert [turn.user for turn in turns] == ["w5 w6", "w7 w8", "w7 w8", "w9"]  # the chat went on
    second, again = turns[1].record(), turns[2].record()
    assert second == {**again, **{key: second[key] for key in second if key.endswith("seconds") or "_per_" in key}}
    assert len(second["reply_token_ids"]) > 1
    assert_transcript_is_the_cache([turns[0].record(), again, turns[3].record()], conversation.cache)


def test_the_session_field_resumes_a_chat_across_runs_as_if_it_never_stopped(tiny, tmp_path):
    """Two runs with `session`: the second resumes where the first ended and appends to the transcript; the
    replies, the transcript and the final cache equal those of one run of all the turns (seeded sampling)."""
    first, second = ["w5 w6 w7", "w8"], ["w9 w10", "w11 w12 w13"]
    config = tiny_config(tiny, temperature=0.9, seed=5, session="mine")
    config.script = script(tmp_path / "first.txt", first)
    chat_program.run(config, tmp_path / "resumed", write=lambda text: None)
    assert (tmp_path / "resumed" / "sessions" / "mine.session.safetensors").is_file()
    with (tmp_path / "resumed" / "transcript.jsonl").open("a") as transcript:  # as if killed before the save
        transcript.write('{"turn": 3, "a record": "of a turn the session does not hold"}\n')
    config.script = script(tmp_path / "second.txt", second)
    resumed, _ = chat_program.run(config, tmp_path / "resumed", write=lambda text: None)
    whole_config = tiny_config(tiny, temperature=0.9, seed=5, script=script(tmp_path / "all.txt", first + second))
    whole, whole_turns = chat_program.run(whole_config, tmp_path / "whole", write=lambda text: None)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "transcript.jsonl").read_text().splitlines()]
    ids = lambda record: (record["turn"], record["input_token_ids"], record["reply_token_ids"])  # noqa: E731
    assert [ids(record) for record in records] == [ids(turn.record()) for turn in whole_turns]
    assert int(whole.cache.next_position[0]) > 16  # past the 2 + 14 cache
    assert_same_cache(resumed.cache, whole.cache)
    assert resumed.messages == whole.messages
    assert_transcript_is_the_cache(records, resumed.cache)
    with pytest.raises(ValueError, match="holds a cache of 2 sinks \\+ 14 window, not the config's 2 \\+ 16"):
        chat_program.run(tiny_config(tiny, session="mine", window=16), tmp_path / "resumed", write=print)


def test_two_processes_chat_as_one_with_process_zero_reading_and_writing(tiny, tmp_path):
    """2 `jax.distributed` processes (4 CPU devices each) on data=2,model=4: process 0 reads the script's turns and
    commands and sends them to process 1; seeded sampling, a /save and a /load (every process gathers the
    cache, process 0 writes the file) and a cache passed: the transcript equals one process's, and process 1
    prints and writes nothing."""
    turns = ["w5 w6 w7", "/save first", "w8 w9", "/load first", "w8 w9", "w10 w11 w12 w13"]
    fields = {"temperature": 0.9, "seed": 3, "script": script(tmp_path / "turns.txt", turns)}
    flags = ["--config=configs/chat.py", *(f"--config.{key}={value}" for key, value in tiny_config(tiny, **fields).items()
             if key not in ("stop", "mesh", "distributed"))]  # fmt: skip
    children = processes.start(processes.experiment("chat", [*flags, "--config.mesh=data=2,model=4"], tmp_path / "two"))
    _, alone = chat_program.run(tiny_config(tiny, **fields), tmp_path / "one", write=lambda text: None)
    results = processes.wait(children, timeout=180)
    processes.assert_succeeded(results)
    records = [json.loads(line) for line in (tmp_path / "two" / "transcript.jsonl").read_text().splitlines()]
    ids = lambda record: (record["turn"], record["input_token_ids"], record["reply_token_ids"])  # noqa: E731
    assert [ids(record) for record in records] == [ids(turn.record()) for turn in alone]
    assert records[1]["reply_token_ids"] == records[2]["reply_token_ids"] and records[-1]["stream_position"] > 16
    assert results[0].stdout.count("model> ") == 4 and "(loaded " in results[0].stdout
    assert (
        "model> " not in results[1].stdout and (tmp_path / "two" / "sessions" / "first.session.safetensors").is_file()
    )


def test_a_chat_killed_mid_conversation_resumes_from_its_last_saved_turn(tiny, tmp_path):
    """The entry point with `session`, SIGKILLed once its transcript has 3 records, then run again with the
    turns after the ones its session holds: replies and transcript equal one uninterrupted run's."""
    turns = [f"w{5 + i % 80}" for i in range(400)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", STREAMJAX_COMPILATION_CACHE=str(tmp_path / "xla"))
    flags = [
        "--config=configs/chat.py", f"--config.model={tiny[0]}", f"--config.chat_template={tiny[1]}",
        "--config.num_sinks=2", "--config.window=14", "--config.max_new_tokens=6", "--config.temperature=0.9",
        "--config.seed=5", "--config.session=mine", "--config.chunk_size=8", "--config.block_size=4",
        f"--config.script={script(tmp_path / 'all.txt', turns)}",
    ]  # fmt: skip
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "experiments.chat", *flags, f"--workdir={out}"], cwd=REPO,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    while child.poll() is None and time.monotonic() < deadline:
        if (out / "transcript.jsonl").exists() and len((out / "transcript.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    child.kill()
    assert child.wait(timeout=30) == -signal.SIGKILL, child.stderr.read().decode()[-3000:]
    config = tiny_config(tiny, temperature=0.9, seed=5, session="mine")
    model = chat_models.load_chat_model(config.model, template_file=config.chat_template)
    done = sessions.load_conversation(out / "sessions" / "mine.session.safetensors", model)[0].turns
    assert 2 <= done < len(turns)  # the transcript had 3 records: the third turn may have been killed in its save
    config.script = script(tmp_path / "rest.txt", turns[done : done + 2])
    resumed, _ = chat_program.run(config, out, write=lambda text: None)
    whole_config = tiny_config(tiny, temperature=0.9, seed=5, script=script(tmp_path / "some.txt", turns[: done + 2]))
    whole, whole_turns = chat_program.run(whole_config, tmp_path / "whole", write=lambda text: None)
    records = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    ids = lambda record: (record["turn"], record["input_token_ids"], record["reply_token_ids"])  # noqa: E731
    assert [ids(record) for record in records] == [ids(turn.record()) for turn in whole_turns]
    assert_same_cache(resumed.cache, whole.cache)


def test_the_entry_point_runs_a_script_and_says_what_is_wrong(tiny, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", STREAMJAX_COMPILATION_CACHE=str(tmp_path / "xla"))
    flags = [
        "--config=configs/chat.py", f"--config.model={tiny[0]}", f"--config.chat_template={tiny[1]}",
        "--config.num_sinks=2", "--config.window=14", "--config.max_new_tokens=5", "--config.temperature=0",
        f"--config.script={script(tmp_path / 'turns.txt', ['w5 w6', 'w7'])}",
    ]  # fmt: skip
    command = [sys.executable, "-m", "experiments.chat", *flags, f"--workdir={tmp_path / 'out'}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model> ") == 2 and "user> w7" in done.stdout
    assert len((tmp_path / "out" / "transcript.jsonl").read_text().splitlines()) == 2
    assert list((tmp_path / "xla").iterdir())  # the persistent compilation cache was written
    bad = subprocess.run([*command[:-1], "--config.top_p=1.5", f"--workdir={tmp_path / 'bad'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "top_p" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.real_assets
def test_smollm2_chats_past_its_cache(smollm2_gguf, tmp_path):
    """Six turns through a 4 + 124 cache: SmolLM2's own template, its end-of-turn id, greedy replies."""
    turns = ["Hi! What is your name?", "Name three colours.", "Which of them is the sky?", "And grass?",
             "Say thank you.", "Goodbye!"]  # fmt: skip
    config = chat_config.get_config()
    config.update({"model": str(smollm2_gguf), "num_sinks": 4, "window": 124, "max_new_tokens": 24,
                   "temperature": 0.0, "script": script(tmp_path / "turns.txt", turns)})  # fmt: skip
    conversation, returned = chat_program.run(config, tmp_path / "out", write=lambda text: None)
    records = [turn.record() for turn in returned]
    assert len(records) == 6 and records[-1]["stream_position"] > 1.5 * 128  # 4 + 124 slots, far past them
    assert records[0]["input_token_ids"][0] == 1  # <|im_start|> of the template's system message
    assert any(r["finish_reason"] == "end_id" and r["reply_token_ids"][-1] == 2 for r in records)  # <|im_end|>
    assert all(r["reply"].strip() for r in records)
    assert_transcript_is_the_cache(records, conversation.cache)
