"""The serving engine (`streamjax.serve.engine`): continuous batching changes no reply.

Every session served next to others, in slots that come and go, must get exactly the replies the chat
library (`streamjax.stream.chat`) gives that conversation alone; sessions that do not fit in the slots
go to disk and come back unchanged; a conversation that disagrees with its session is answered from
a fresh stream; a cancelled reply frees its slot.
"""

from __future__ import annotations

import random
import threading

import pytest

from streamjax.files import chat_models
from streamjax.serve import engine as serving
from streamjax.stream import chat, generation, sampling, stopping
from support import tiny_chat
from support.models import CHATML_TEMPLATE, random_hf_llama, save_byte_tokenizer

NUM_SINKS, WINDOW, MAX_TOKENS, CHUNK, BLOCK = 2, 30, 6, 8, 4  # caches of 32 slots: every session evicts
tiny = tiny_chat.tiny


@pytest.fixture(scope="module")
def model(tiny):
    return chat_models.load_chat_model(str(tiny[0]), template_file=str(tiny[1]))


def make_engine(model, tmp_path, slots: int) -> serving.Engine:
    settings = serving.EngineSettings(
        slots=slots, num_sinks=NUM_SINKS, window=WINDOW, session_dir=str(tmp_path / "sessions"),
        default_max_tokens=MAX_TOKENS, chunk_size=CHUNK, block_size=BLOCK,
    )  # fmt: skip
    engine = serving.Engine(model, settings)
    engine.start()
    return engine


def serve(engine: serving.Engine, request: serving.Request) -> tuple[list[str], serving.Event]:
    """(the text deltas, the last event) of one request, waited for (bounded)."""
    deltas, done, last = [], threading.Event(), []

    def on_event(event):
        if isinstance(event, serving.TextDelta):
            deltas.append(event.text)
        else:
            last.append(event)
            done.set()

    engine.submit(request, on_event)
    assert done.wait(300), "no reply within 300 s"
    return deltas, last[0]


def user_turns(name: str, count: int) -> list[str]:
    words = random.Random(name)
    return [" ".join(f"w{words.randrange(5, 60)}" for _ in range(words.randrange(1, 6))) for _ in range(count)]


def converse(engine, name: str, turns: list[str], temperature: float, replies: dict) -> None:
    """A client: each turn sends the whole conversation so far (replies as returned) to session `name`."""
    messages, finished = [], []
    for turn, user in enumerate(turns):
        messages.append({"role": "user", "content": user})
        request = serving.Request(tuple(messages), session_id=name, temperature=temperature, seed=100 + turn)
        deltas, event = serve(engine, request)
        assert isinstance(event, serving.Finished), event
        assert "".join(deltas) == event.text
        finished.append(event)
        messages.append({"role": "assistant", "content": event.text})
    replies[name] = finished


def library_turns(model, turns: list[str], temperature: float) -> list[chat.Turn]:
    """The same conversation through the chat library alone."""
    conversation = chat.new_conversation(model, NUM_SINKS, WINDOW)
    stops = stopping.stop_conditions(1, end_ids=model.end_ids, max_new_tokens=MAX_TOKENS)
    records = []
    for turn, user in enumerate(turns):
        settings = sampling.sampling_settings(1, temperature=temperature, seed=100 + turn)
        conversation, record = chat.chat_turn(
            model, conversation, user, settings, stops, chunk_size=CHUNK, block_size=BLOCK
        )
        records.append(record)
    return records


def assert_same_as_alone(model, name: str, turns: list[str], temperature: float, served: list) -> None:
    expected = library_turns(model, turns, temperature)
    assert [event.text for event in served] == [record.reply for record in expected], name
    assert [event.prompt_tokens for event in served] == [len(record.input_token_ids) for record in expected]
    assert [event.completion_tokens for event in served] == [len(record.reply_token_ids) for record in expected]
    assert [event.session for event in served] == ["new"] + ["continued"] * (len(turns) - 1)


def run_clients(engine, sessions: dict[str, tuple[list[str], float]]) -> dict:
    replies = {}
    clients = [
        threading.Thread(target=converse, args=(engine, name, turns, temperature, replies))
        for name, (turns, temperature) in sessions.items()
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(600)
    assert set(replies) == set(sessions), "a client did not finish"
    return replies


def test_eight_concurrent_sessions_get_what_each_gets_alone(model, tmp_path):
    sessions = {f"s{i}": (user_turns(f"s{i}", 20), 0.0 if i % 2 else 1.0) for i in range(8)}
    engine = make_engine(model, tmp_path, slots=8)
    try:
        replies = run_clients(engine, sessions)
        metrics = engine.metrics()
    finally:
        engine.close()
    assert metrics["sessions_resident"] == 8 and metrics["slots_busy"] == 0 and metrics["requests_total"] == 160
    for name, (turns, temperature) in sessions.items():
        assert_same_as_alone(model, name, turns, temperature, replies[name])
    assert any(event.finish_reason == "stop" for events in replies.values() for event in events)  # an end id


def test_sessions_beyond_the_slots_go_to_disk_and_come_back_unchanged(model, tmp_path):
    sessions = {f"d{i}": (user_turns(f"d{i}", 5), 1.0) for i in range(5)}
    engine = make_engine(model, tmp_path, slots=2)
    try:
        replies = run_clients(engine, sessions)
        metrics = engine.metrics()
    finally:
        engine.close()
    assert metrics["sessions_resident"] == 2 and metrics["sessions_saved"] >= 3
    for name, (turns, temperature) in sessions.items():
        assert_same_as_alone(model, name, turns, temperature, replies[name])
    # close() saved the resident ones too: a new engine continues every session from its file.
    engine = make_engine(model, tmp_path, slots=2)
    try:
        more = {
            name: (turns + user_turns(name + "more", 2), temperature) for name, (turns, temperature) in sessions.items()
        }
        for name, (turns, temperature) in more.items():
            messages = [m for user, event in zip(turns, replies[name]) for m in (
                {"role": "user", "content": user}, {"role": "assistant", "content": event.text})]  # fmt: skip
            for turn in range(5, 7):
                messages.append({"role": "user", "content": turns[turn]})
                request = serving.Request(tuple(messages), session_id=name, temperature=temperature, seed=100 + turn)
                _, event = serve(engine, request)
                replies[name].append(event)
                messages.append({"role": "assistant", "content": event.text})
    finally:
        engine.close()
    for name, (turns, temperature) in more.items():
        assert_same_as_alone(model, name, turns, temperature, replies[name])


def test_a_conversation_that_disagrees_with_its_session_is_answered_from_a_fresh_stream(model, tmp_path):
    engine = make_engine(model, tmp_path, slots=2)
    try:
        first = [{"role": "user", "content": "w5 w6"}]
        _, reply = serve(engine, serving.Request(tuple(first), session_id="a", temperature=0.0))
        edited = [*first, {"role": "assistant", "content": reply.text + " w7"}, {"role": "user", "content": "w8"}]
        _, event = serve(engine, serving.Request(tuple(edited), session_id="a", temperature=0.0))
        _, one_shot = serve(engine, serving.Request(tuple(edited), temperature=0.0))
    finally:
        engine.close()
    assert (reply.session, event.session, one_shot.session) == ("new", "restarted", None)
    conversation = chat.new_conversation(model, NUM_SINKS, WINDOW)
    inputs = chat.messages_input(model, conversation, edited)
    stops = stopping.stop_conditions(1, end_ids=model.end_ids, max_new_tokens=MAX_TOKENS)
    alone = generation.generate(model.params, conversation.cache, [inputs], model.config, None, stops)
    expected = chat.ReplyText(model.tokenizer, model.end_ids)
    expected.add(alone.tokens[0].tolist())
    assert event.text == one_shot.text == expected.text
    assert event.prompt_tokens == len(inputs)


def test_a_cancelled_reply_frees_its_slot_and_drops_its_session(model, tmp_path):
    engine = make_engine(model, tmp_path, slots=1)
    events = []

    def cancel_at_once(event):
        events.append(event)
        ticket.cancel()

    try:
        ticket = engine.submit(
            serving.Request(({"role": "user", "content": "w5"},), session_id="c", max_tokens=60, temperature=0.0),
            cancel_at_once,
        )
        _, after = serve(engine, serving.Request(({"role": "user", "content": "w9"},), session_id="c"))
        metrics = engine.metrics()
    finally:
        engine.close()
    assert events and all(isinstance(event, serving.TextDelta) for event in events)  # never finished
    assert after.session == "new" and metrics["slots_busy"] == 0


def test_requests_it_cannot_serve_are_refused_before_they_are_queued(model, tmp_path):
    engine = serving.Engine(model, serving.EngineSettings(slots=1, num_sinks=2, window=30, session_dir=str(tmp_path)))
    user = ({"role": "user", "content": "w5"},)
    bad = {
        "max_tokens": (serving.Request(user, max_tokens=5000), r"max_tokens must be in \[0, 4096\]"),
        "session id": (serving.Request(user, session_id="../x"), "session"),
        "no messages": (serving.Request(), "exactly one"),
        "both": (serving.Request(user, prompt="w5"), "exactly one"),
        "ends with a reply": (serving.Request(({"role": "assistant", "content": "w5"},)), "end with a user"),
        "completion session": (serving.Request(prompt="w5", session_id="x"), "one-shot"),
        "temperature": (serving.Request(user, temperature=-1.0), "temperature"),
        "top_p": (serving.Request(user, top_p=0.0), "top_p"),
        "stop strings": (serving.Request(user, stop=("w5",)), "no stop strings"),  # word-level: no token bytes
    }
    for case, (request, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            engine.submit(request, lambda event: None)
        assert engine.metrics()["queue_length"] == 0, case
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        serving.Engine(model, serving.EngineSettings(slots=0))


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer (stop strings need tokens' bytes) and ChatML."""
    root = tmp_path_factory.mktemp("byte_chat")
    hf = random_hf_llama(seed=5, vocab_size=258, max_position_embeddings=1024, eos_token_id=257)
    hf.save_pretrained(root / "model")
    save_byte_tokenizer(root / "model")
    (root / "template.jinja").write_text(CHATML_TEMPLATE)
    return chat_models.load_chat_model(str(root / "model"), template_file=str(root / "template.jinja"))


def test_a_stop_string_ends_the_reply_where_the_library_stops_and_is_cut_from_the_text(byte_model, tmp_path):
    messages = ({"role": "user", "content": "hello"},)
    engine = make_engine(byte_model, tmp_path, slots=2)
    try:
        _, free = serve(engine, serving.Request(messages, max_tokens=24, temperature=0.0))
        # Two printable ASCII characters from the reply past its start (random bytes are not all UTF-8).
        at = next(
            i
            for i in range(3, len(free.text) - 1)
            if free.text[i : i + 2].isascii() and free.text[i : i + 2].isprintable()
        )
        stop = free.text[at : at + 2]
        deltas, event = serve(engine, serving.Request(messages, max_tokens=24, temperature=0.0, stop=(stop,)))
    finally:
        engine.close()
    conversation = chat.new_conversation(byte_model, NUM_SINKS, WINDOW)
    stops = stopping.stop_conditions(
        1, end_ids=byte_model.end_ids, max_new_tokens=24, stop=[stop], tokenizer=byte_model.tokenizer,
        vocab_size=byte_model.config.vocab_size,
    )  # fmt: skip
    inputs = chat.messages_input(byte_model, conversation, list(messages))
    alone = generation.generate(byte_model.params, conversation.cache, [inputs], byte_model.config, None, stops)
    assert alone.reasons == ["stop_string"] and event.finish_reason == "stop"
    assert event.completion_tokens == len(alone.tokens[0])
    assert event.text == free.text[: free.text.find(stop)] == "".join(deltas)  # the stop string never shown
