"""The HTTP server (`experiments.serve`, `streamjax.serve.api`), started as a subprocess on 127.0.0.1 with a tiny
random Llama (word-level tokenizer: the text "w5 w6" is the token ids 5, 6) and talked to with the official
`openai` client and with raw HTTP.

One server serves the whole module (its start and first compilations dominate the time); replies are greedy
and short. Every bad request is sent for real: it gets its status and OpenAI's error object, reaches no engine
(the engine's request and token totals do not move) and leaves a session's next reply as it would have been.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx  # openai's HTTP client (httpx, renamed)
import jax
import ml_collections
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from configs import serve as serve_config
from experiments import serve as serve_program
from streamjax.files import chat_models
from streamjax.files import sessions as session_files
from streamjax.model.cache import init_cache
from streamjax.serve import api
from streamjax.serve import engine as engine_lib
from streamjax.stream import chat, generation, sampling, stopping
from support import tiny_chat
from support.tiny_chat import REPO

tiny = tiny_chat.tiny  # the shared fixture, under its name
API_KEY = "test-key-1234"
MAX_BODY_BYTES = 4096
MAX_TOKENS_LIMIT = 1_000_000  # a disconnected stream could run for minutes: only a cancel frees its slot
START_SECONDS = 300  # bounded waits: the server's start (loading, first compilations) on a shared 2-core CPU
REQUEST_SECONDS = 120
NUM_SINKS, WINDOW = 2, 30  # each stream's cache, on the server and in the library's replies it must equal
ENGINE_METRICS = ("sessions_resident", "sessions_saved", "slots_busy", "queue_length", "requests_total",
                  "prompt_tokens_total", "completion_tokens_total")  # fmt: skip


@dataclasses.dataclass
class Served:
    """A running server: its process, where it listens, and what it serves."""

    process: subprocess.Popen
    workdir: pathlib.Path
    log: pathlib.Path
    base_url: str
    model: str

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=REQUEST_SECONDS)

    def http(self, api_key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=REQUEST_SECONDS)

    def metrics(self) -> dict[str, float]:
        """{sample name (with labels, if any): value} of GET /metrics, parsed by prometheus_client's parser."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=REQUEST_SECONDS).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return samples

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_server(model_dir, template, workdir: pathlib.Path, **fields) -> Served:
    """`python -m experiments.serve` on a free port of 127.0.0.1; returns once workdir/server.json says where."""
    overrides = {"model": model_dir, "chat_template": template, "port": 0, "api_key": API_KEY,
                 "num_sinks": NUM_SINKS, "window": WINDOW, "slots": 2, "max_body_bytes": MAX_BODY_BYTES,
                 "default_max_tokens": 6, "max_tokens_limit": MAX_TOKENS_LIMIT, "chunk_size": 8, "block_size": 4,
                 **fields}  # fmt: skip
    command = [sys.executable, "-m", "experiments.serve", "--config=configs/serve.py", f"--workdir={workdir}"]
    command += [f"--config.{name}={value}" for name, value in overrides.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", STREAMJAX_COMPILATION_CACHE=str(workdir.parent / "xla"))
    workdir.mkdir(parents=True)
    log = workdir.parent / f"{workdir.name}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    served = Served(process, workdir, log, "", str(model_dir))
    deadline = time.monotonic() + START_SECONDS
    while not (workdir / "server.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(served)
            pytest.fail(f"the server did not start (exit code {process.returncode}):\n{served.log_tail()}")
        time.sleep(0.2)
    address = json.loads((workdir / "server.json").read_text())
    assert address["pid"] == process.pid and address["model"] == str(model_dir)
    served.base_url = f"http://{address['host']}:{address['port']}"
    return served


def stop_server(served: Served, wait_seconds: float = 60) -> int:
    """SIGTERM, then SIGKILL if it has not ended within `wait_seconds`; returns the exit code."""
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(wait_seconds)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait(30)
    return served.process.returncode


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    served = start_server(*tiny, tmp_path_factory.mktemp("serve") / "workdir")
    try:
        yield served
    finally:
        stop_server(served)


@pytest.fixture(scope="module")
def chat_model(tiny):
    return chat_models.load_chat_model(str(tiny[0]), template_file=str(tiny[1]))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def library_chat(chat_model, user_turns: list[str], max_tokens: int) -> list[chat.Turn]:
    """The chat library's greedy turns of one conversation, alone in its cache (what the server must match)."""
    conversation = chat.new_conversation(chat_model, NUM_SINKS, WINDOW)
    stops = stopping.stop_conditions(1, end_ids=sorted(chat_model.end_ids), max_new_tokens=max_tokens)
    turns = []
    for text in user_turns:
        conversation, turn = chat.chat_turn(
            chat_model, conversation, text, sampling.sampling_settings(1, temperature=0.0), stops, chunk_size=8
        )
        turns.append(turn)
    return turns


def library_completion(chat_model, prompt: str, max_tokens: int) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids, reason) of a greedy completion of `prompt` in a fresh cache."""
    ids = chat_model.tokenizer(prompt).input_ids
    cache = init_cache(chat_model.config, 1, NUM_SINKS, WINDOW, jax.tree.leaves(chat_model.params)[0].dtype)
    stops = stopping.stop_conditions(1, end_ids=sorted(chat_model.end_ids), max_new_tokens=max_tokens)
    result = generation.generate(chat_model.params, cache, [ids], chat_model.config, None, stops, chunk_size=8)
    return ids, result.tokens[0].tolist(), result.reasons[0]


def test_models_health_and_metrics(server):
    client = server.client()
    assert [model.id for model in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("another-model")
    health = httpx.get(f"{server.base_url}/health", timeout=REQUEST_SECONDS)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    metrics = server.metrics()
    for name in ENGINE_METRICS:
        assert f"streamjax_{name}" in metrics
    assert metrics["streamjax_http_responses_total{path=/v1/models,status=200}"] >= 1


def test_a_chat_reply_whole_and_streamed_is_the_librarys_with_its_token_counts(server, chat_model):
    client, messages = server.client(), [user("w5 w6 w7")]
    (turn,) = library_chat(chat_model, ["w5 w6 w7"], max_tokens=6)
    whole = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6, temperature=0)
    assert whole.object == "chat.completion" and whole.model == server.model
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == turn.reply
    assert whole.choices[0].finish_reason == engine_lib.FINISH_REASONS[turn.finish_reason]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        len(turn.input_token_ids),
        len(turn.reply_token_ids),
    )
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.session is None  # one-shot
    chunks = list(client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks, final, usage_chunk = chunks[:-2], chunks[-2], chunks[-1]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in text_chunks) == turn.reply
    assert [chunk.choices[0].finish_reason for chunk in text_chunks] == [None] * len(text_chunks)
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason and final.session is None
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_a_completion_whole_and_streamed_counts_the_tokens_fed_and_generated(server, chat_model):
    client, prompt = server.client(), "w9 w10 w11 w12"
    prompt_ids, generated, reason = library_completion(chat_model, prompt, max_tokens=5)
    whole = client.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == engine_lib.FINISH_REASONS[reason]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), len(generated))
    shown = [token for token in generated if token not in chat_model.end_ids]
    assert whole.choices[0].text == chat.decode_text(chat_model.tokenizer, shown)
    chunks = list(client.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0,
                                            stream=True))  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert [chunk.choices[0].finish_reason for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_raw_http_server_sent_events_end_with_done(server):
    body = {"model": server.model, "messages": [user("w5")], "max_tokens": 3, "temperature": 0, "stream": True,
            "unknown_field": {"ignored": True}}  # fmt: skip
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "session" in events[-1]


def test_content_parts_are_joined_text(server):
    client = server.client()
    parts = [{"type": "text", "text": "w5 w6"}, {"type": "text", "text": "w7"}]
    as_parts = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": parts}], max_tokens=4, temperature=0
    )
    as_text = client.chat.completions.create(
        model=server.model, messages=[user("w5 w6\nw7")], max_tokens=4, temperature=0
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage == as_text.usage


def test_a_session_continues_and_a_history_that_disagrees_is_answered_from_a_fresh_stream(server, chat_model):
    client, ask = server.client(), {"model": server.model, "max_tokens": 4, "temperature": 0}
    first_turn, second_turn = library_chat(chat_model, ["w5 w6", "w7 w8"], max_tokens=4)
    history = [user("w5 w6")]
    first = client.chat.completions.create(messages=history, extra_headers={"X-Session-Id": "alpha"}, **ask)
    assert first.session == "new" and first.choices[0].message.content == first_turn.reply
    history += [{"role": "assistant", "content": first.choices[0].message.content}, user("w7 w8")]
    second = client.chat.completions.create(messages=history, extra_body={"session_id": "alpha"}, **ask)
    assert second.session == "continued" and second.choices[0].message.content == second_turn.reply
    assert second.usage.prompt_tokens == len(second_turn.input_token_ids)  # only what is new since turn 1
    (fresh,) = library_chat(chat_model, ["w9"], max_tokens=4)
    third = client.chat.completions.create(messages=[user("w9")], extra_body={"session_id": "alpha"}, **ask)
    assert third.session == "restarted" and third.choices[0].message.content == fresh.reply
    assert third.usage.prompt_tokens == len(fresh.input_token_ids)


CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def bad_requests(model: str) -> list[tuple[str, str, dict | bytes, int, str | None, dict]]:
    """(what is wrong, path, body, status, the error's param, headers besides the session's) of bad requests."""
    chat_body = lambda **fields: {"model": model, "messages": [user("w5")], **fields}  # noqa: E731
    oversized = json.dumps(chat_body(padding="x" * MAX_BODY_BYTES)).encode()
    return [
        ("malformed JSON", CHAT, b'{"model": ', 400, None, {}),
        ("JSON that is not an object", CHAT, b"[1, 2]", 400, None, {}),
        ("a body that is not UTF-8", CHAT, b"\xff\xfe{}", 400, None, {}),
        ("a body over the limit", CHAT, oversized, 413, None, {}),
        ("an unknown model", CHAT, chat_body(model="gpt-4o"), 404, "model", {}),
        ("no model", CHAT, {"messages": [user("w5")]}, 400, "model", {}),
        ("a negative max_tokens", CHAT, chat_body(max_tokens=-1), 400, "max_tokens", {}),
        ("a max_tokens of 0", CHAT, chat_body(max_tokens=0), 400, "max_tokens", {}),
        ("a fractional max_tokens", CHAT, chat_body(max_tokens=2.5), 400, "max_tokens", {}),
        ("a max_tokens that is a string", CHAT, chat_body(max_tokens="8"), 400, "max_tokens", {}),
        ("an absurd max_tokens (engine.check)", CHAT, chat_body(max_tokens=10**12), 400, None, {}),
        ("a negative max_completion_tokens", CHAT, chat_body(max_completion_tokens=-5), 400,
         "max_completion_tokens", {}),
        ("a temperature below 0", CHAT, chat_body(temperature=-0.5), 400, "temperature", {}),
        ("a temperature above 2", CHAT, chat_body(temperature=2.5), 400, "temperature", {}),
        ("a temperature that is NaN", CHAT, json.dumps(chat_body(temperature=float("nan"))).encode(), 400,
         "temperature", {}),
        ("a top_p of 0", CHAT, chat_body(top_p=0), 400, "top_p", {}),
        ("a top_p above 1", CHAT, chat_body(top_p=1.5), 400, "top_p", {}),
        ("an unknown role", CHAT, chat_body(messages=[{"role": "wizard", "content": "w5"}]), 400,
         "messages[0].role", {}),
        ("no messages", CHAT, {"model": model}, 400, "messages", {}),
        ("empty messages", CHAT, chat_body(messages=[]), 400, "messages", {}),
        ("a last message not the user's", CHAT, chat_body(messages=[user("w5"), {"role": "assistant",
         "content": "w6"}]), 400, "messages", {}),
        ("content that is a number", CHAT, chat_body(messages=[{"role": "user", "content": 5}]), 400,
         "messages[0].content", {}),
        ("content with an image part", CHAT, chat_body(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]), 400,
         "messages[0].content", {}),
        ("n of 2", CHAT, chat_body(n=2), 400, "n", {}),
        ("n of true", CHAT, chat_body(n=True), 400, "n", {}),
        ("a seed that is a string", CHAT, chat_body(seed="7"), 400, "seed", {}),
        ("a stream that is not a boolean", CHAT, chat_body(stream="yes"), 400, "stream", {}),
        ("stream_options that are not an object", CHAT, chat_body(stream=True, stream_options=[1]), 400,
         "stream_options", {}),
        ("a stop that is not a string", CHAT, chat_body(stop=[5]), 400, "stop", {}),
        ("too many stop strings (engine.check)", CHAT, chat_body(stop=["w1", "w2", "w3", "w4", "w5"]), 400, None,
         {}),
        ("stream_options without stream", CHAT, chat_body(stream_options={"include_usage": True}), 400,
         "stream_options", {}),
        ("tools", CHAT, chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", {}),
        ("a body session_id that differs from the header", CHAT, chat_body(session_id="gamma"), 400, "session_id",
         {}),
        ("a session id with path characters (engine.check)", CHAT, chat_body(), 400, None,
         {"X-Session-Id": "../escape"}),
        ("a completion without a prompt", TEXT, {"model": model}, 400, "prompt", {}),
        ("a completion whose prompt is a list", TEXT, {"model": model, "prompt": ["w5"]}, 400, "prompt", {}),
        ("a completion with a session (engine.check)", TEXT, {"model": model, "prompt": "w5"}, 400, None, {}),
    ]  # fmt: skip


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """`response` is OpenAI's error object with `status`; returns the error."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param
    return error


def test_every_bad_request_gets_its_error_and_changes_nothing(server, chat_model):
    """Each bad request, sent for real between two turns of a session, gets its 4xx and OpenAI's error object;
    none reaches the engine (its totals do not move) and the session's next reply is the library's."""
    client, ask = server.client(), {"model": server.model, "max_tokens": 4, "temperature": 0}
    first_turn, second_turn = library_chat(chat_model, ["w11 w12", "w13"], max_tokens=4)
    session = {"X-Session-Id": "beta"}
    first = client.chat.completions.create(messages=[user("w11 w12")], extra_headers=session, **ask)
    assert first.choices[0].message.content == first_turn.reply
    before = server.metrics()
    with server.http() as http:
        for what, path, body, status, param, headers in bad_requests(server.model):
            sent = {"content": body} if isinstance(body, bytes) else {"json": body}
            response = http.post(path, headers={**session, "Content-Type": "application/json", **headers}, **sent)
            assert_error(response, status, param), what
        chunked = http.post(CHAT, headers=session, content=iter([b" " * 1024] * (MAX_BODY_BYTES // 1024 + 2)))
        assert_error(chunked, 413)  # no Content-Length: refused once the body read passes the limit
        assert_error(http.get("/v1/no-such-route"), 404)
        assert_error(http.get(CHAT), 405)
    after = server.metrics()
    for name in ("streamjax_requests_total", "streamjax_prompt_tokens_total", "streamjax_completion_tokens_total"):
        assert after[name] == before[name], name
    assert after["streamjax_http_responses_total{path=/v1/chat/completions,status=400}"] >= 20
    history = [user("w11 w12"), {"role": "assistant", "content": first.choices[0].message.content}, user("w13")]
    second = client.chat.completions.create(messages=history, extra_headers=session, **ask)
    assert second.session == "continued" and second.choices[0].message.content == second_turn.reply


def test_the_api_key_is_required_on_v1_routes(server):
    body = {"model": server.model, "prompt": "w5", "max_tokens": 1}
    for api_key in (None, "wrong-key", API_KEY + "x", API_KEY[:-1]):
        with server.http(api_key) as http:
            assert_error(http.post(TEXT, json=body), 401)
            error = assert_error(http.get("/v1/models"), 401)
            assert error["code"] == "invalid_api_key"
    with server.http(None) as http:
        basic = http.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"})
        assert_error(basic, 401)
        assert http.get("/health").status_code == http.get("/metrics").status_code == 200  # open without a key
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").models.list()


def test_a_client_that_goes_away_frees_its_slot(server, chat_model):
    """A stream read once and closed, and a whole reply given up by its client, both of a reply allowed to run
    for MAX_TOKENS_LIMIT tokens: the slot is free again within seconds and the reply never finishes."""
    prompt, at_least = "w20 w21 w22", 200
    probe = server.client().completions.create(model=server.model, prompt=prompt, max_tokens=at_least, temperature=0)
    assert probe.choices[0].finish_reason == "length"  # greedy from this prompt does not end within 200 tokens
    body = {"model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0}
    before = server.metrics()
    with server.http() as http:
        with http.stream("POST", TEXT, json={**body, "stream": True}) as response:
            lines = response.iter_lines()  # held: a dropped iterator closes the response
            assert next(lines).startswith("data: ") and server.metrics()["streamjax_slots_busy"] == 1
    wait_for_free_slots(server)
    with pytest.raises(httpx.ReadTimeout), server.http() as http:
        http.post(TEXT, json=body, timeout=httpx.Timeout(REQUEST_SECONDS, read=2.0))
    wait_for_free_slots(server)
    after = server.metrics()
    assert after["streamjax_requests_total"] == before["streamjax_requests_total"] + 2
    # A reply that ran to an end would have added at least `at_least` tokens.
    assert after["streamjax_completion_tokens_total"] - before["streamjax_completion_tokens_total"] < at_least


def wait_for_free_slots(server: Served, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while server.metrics()["streamjax_slots_busy"] != 0:
        assert time.monotonic() < deadline, "the slot of a client that went away was not freed"
        time.sleep(0.1)


class FaultyEngine:
    """An engine that fails as a fault would: `submit` raises an unexpected error ("raise") or the request
    fails in the engine's thread ("fail"). For the paths no well-formed request reaches on the real engine."""

    def __init__(self, fault: str):
        self.fault, self.cancelled = fault, 0

    def submit(self, request, on_event):
        if self.fault == "raise":
            raise RuntimeError("an unexpected fault")
        threading.Thread(target=on_event, args=(engine_lib.Failed("the chat template refused"),)).start()
        return self

    def cancel(self) -> None:
        self.cancelled += 1

    def metrics(self) -> dict[str, int]:
        return {"slots_busy": 0}


def test_an_unexpected_error_or_a_failed_request_is_a_500_and_the_server_goes_on():
    from fastapi.testclient import TestClient

    body = {"model": "tiny", "messages": [user("w5")]}
    with TestClient(api.create_app(FaultyEngine("raise"), model_name="tiny", max_body_bytes=1000)) as client:
        error = assert_error(client.post(CHAT, json=body), 500)
        assert "RuntimeError: an unexpected fault" in error["message"]
        assert client.get("/health").json() == {"status": "ok"}
        assert (
            'streamjax_http_responses_total{path="/v1/chat/completions",status="500"} 1.0'
            in client.get("/metrics").text
        )
    with TestClient(api.create_app(FaultyEngine("fail"), model_name="tiny", max_body_bytes=1000)) as client:
        assert "the chat template refused" in assert_error(client.post(CHAT, json=body), 500)["message"]
        streamed = client.post(CHAT, json={**body, "stream": True})
        lines = [line for line in streamed.text.splitlines() if line]
        assert streamed.status_code == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "server_error"


def tiny_serve_config(**fields) -> ml_collections.ConfigDict:
    config = serve_config.get_config()
    config.update({"model": "/nonexistent/model", **fields})
    return config


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"host": "0.0.0.0"}, "api_key"),
        ({"host": "example.com"}, "api_key"),
        ({"port": 70000}, "port"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"slots": 0}, "slots"),
        ({"window": 0}, "window"),
        ({"default_max_tokens": 5000}, "default_max_tokens"),
        ({"max_stop_strings": 0}, "max_stop_strings"),
        ({"dtype": "int8"}, "int8"),
        ({"model": ""}, "model"),
    ],
)
def test_a_bad_config_is_refused_before_anything_is_loaded(fields, named, tmp_path):
    with pytest.raises(ValueError, match=named):
        serve_program.check_config(tiny_serve_config(**fields), tmp_path)


def test_a_config_that_can_run_passes_its_check(tmp_path):
    for fields in ({}, {"host": "::1"}, {"host": "localhost"}, {"host": "0.0.0.0", "api_key": "k"}):
        settings = serve_program.check_config(tiny_serve_config(**fields), tmp_path)
        assert settings.session_dir == str(tmp_path / "sessions") and settings.slots == 8


def test_the_command_refuses_a_public_host_without_a_key(tmp_path):
    command = [sys.executable, "-m", "experiments.serve", "--config=configs/serve.py", f"--workdir={tmp_path / 'w'}",
               "--config.model=/nonexistent/model", "--config.host=0.0.0.0"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "api_key" in done.stderr and "nonexistent" not in done.stderr
    assert not (tmp_path / "w").exists()


def test_sigterm_saves_the_sessions_and_exits_0(server):
    """Last in the module: it stops the module's server."""
    ask = {"model": server.model, "max_tokens": 3, "temperature": 0}
    reply = server.client().chat.completions.create(messages=[user("w30")], extra_body={"session_id": "kept"}, **ask)
    assert reply.session == "new"
    assert stop_server(server) == 0, server.log_tail()
    assert session_files.session_path(server.workdir / "sessions", "kept").exists()
    assert not (server.workdir / "server.json").exists()
