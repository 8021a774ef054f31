"""The HTTP layer of the server: OpenAI's chat and text completions on the batching engine (`engine`).

`create_app(engine, model_name=..., api_key=..., max_body_bytes=...)` is a FastAPI app with

    POST /v1/chat/completions   OpenAI's `chat.completion` (or, with "stream": true, server-sent
                                `chat.completion.chunk` events ending with `data: [DONE]`)
    POST /v1/completions        the same for a raw text prompt (`text_completion`)
    GET  /v1/models             the one model served; GET /v1/models/{id} too
    GET  /health                {"status": "ok"}
    GET  /metrics               Prometheus text: the engine's gauges and totals, responses by path and status,
                                histograms of time to first token and request duration

Every completion also carries `session`: the engine's word on the conversation ("new", "continued",
"restarted" when the history the client sent disagreed with the session's and a fresh stream answered;
null for a one-shot request). A session is named by the body's `session_id` or the `X-Session-Id` header.

A request is checked completely before anything reaches the engine; a bad one gets OpenAI's error
object, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status, and changes nothing. With an
`api_key`, every /v1 route wants `Authorization: Bearer <key>` (compared in constant time); /health and
/metrics stay open. An unexpected exception answers 500 with an error object; the server goes on.

The engine calls back from its own thread; each event crosses to the event loop with
`loop.call_soon_threadsafe(queue.put_nowait, event)`. A client that goes away before its reply ends
(streamed or whole) cancels its ticket, which frees the slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import fastapi
import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from streamjax.serve import engine as engine_lib
from streamjax.stream import templates

logger = logging.getLogger(__name__)

# OpenAI fields that change the reply in a way the engine cannot: refused unless absent or at these values.
UNSUPPORTED = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}
SESSION_HEADER = "x-session-id"
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, math.inf)
ENGINE_METRICS_HELP = {
    "sessions_resident": "Sessions whose cache is on the device",
    "sessions_saved": "Sessions saved to disk",
    "slots_busy": "Slots of the batched cache serving a request",
    "queue_length": "Requests waiting for a slot",
    "requests_total": "Requests the engine has finished",
    "prompt_tokens_total": "Prompt tokens fed",
    "completion_tokens_total": "Tokens generated",
}


class ApiError(Exception):
    """A request the server refuses: answered with OpenAI's error object and `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> fastapi.responses.JSONResponse:
        error_type = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": error_type, "param": self.param, "code": self.code}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return fastapi.responses.JSONResponse({"error": error}, status_code=self.status, headers=headers)


def create_app(
    engine: engine_lib.Engine, *, model_name: str, api_key: str = "", max_body_bytes: int
) -> fastapi.FastAPI:
    """The server's app on a started `engine` (see the module's docstring)."""
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
    metrics = Metrics(engine)
    app = fastapi.FastAPI(title="streamjax", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(Guard, metrics=metrics)
    server = Server(engine, model_name, api_key, max_body_bytes, metrics)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", server.model, methods=["GET"])
    app.add_api_route("/health", lambda: {"status": "ok"}, methods=["GET"])
    app.add_api_route("/metrics", metrics.response, methods=["GET"])
    return app


async def _api_error(request: fastapi.Request, error: ApiError) -> fastapi.responses.JSONResponse:
    return error.response()


async def _http_error(request: fastapi.Request, error: HTTPException) -> fastapi.responses.JSONResponse:
    """Starlette's own refusals (no such route, wrong method) as OpenAI error objects."""
    return ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").response()


class Server:
    """The routes: each checks its request completely, then hands it to the engine."""

    def __init__(self, engine, model_name: str, api_key: str, max_body_bytes: int, metrics: Metrics):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_body_bytes, self.metrics = max_body_bytes, metrics
        self.created = int(time.time())

    async def chat_completions(self, request: fastapi.Request):
        body = await self.read_request(request)
        query = engine_lib.Request(
            messages=chat_messages(body), session_id=session_id(body, request.headers), **sampling_fields(body)
        )
        return await self.complete(request, query, Shape("chat", self.model_name), streaming(body))

    async def completions(self, request: fastapi.Request):
        body = await self.read_request(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, f"prompt must be a non-empty string, got {prompt!r}", "prompt")
        query = engine_lib.Request(prompt=prompt, session_id=session_id(body, request.headers), **sampling_fields(body))
        return await self.complete(request, query, Shape("text", self.model_name), streaming(body))

    async def models(self, request: fastapi.Request):
        self.authorize(request)
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, request: fastapi.Request, model_id: str):
        self.authorize(request)
        self.check_model(model_id)
        return self.model_card()

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "streamjax"}

    async def read_request(self, request: fastapi.Request) -> dict[str, Any]:
        """The body of a completion request as a dict, after the key, the size, the JSON and the model."""
        self.authorize(request)
        body = parse_json(await read_body(request, self.max_body_bytes))
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, f"model must be a non-empty string (this server serves {self.model_name!r})", "model")
        self.check_model(model)
        refuse_unsupported(body)
        return body

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")  # fmt: skip

    def authorize(self, request: fastapi.Request) -> None:
        """ApiError 401 unless no key is set or `Authorization: Bearer <key>` matches it (constant time)."""
        if not self.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                           None, "invalid_api_key")  # fmt: skip

    async def complete(self, request: fastapi.Request, query: engine_lib.Request, shape: Shape, stream: dict):
        """Submit `query` (the engine checks it first: its ValueError is a 400) and answer as a stream of
        server-sent events or as one object."""
        timing = Timing(self.metrics, shape.kind)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            ticket = self.engine.submit(query, bridge(loop, events))
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        if stream["stream"]:
            body = event_stream(shape, events, ticket, timing, stream["include_usage"])
            return fastapi.responses.StreamingResponse(body, media_type="text/event-stream")
        event = await whole_reply(request, events, ticket, timing)
        if event is None:  # the client went away: nobody reads this answer
            return fastapi.Response(status_code=499)
        if isinstance(event, engine_lib.Failed):
            raise ApiError(500, f"the engine failed on this request: {event.message}")
        return shape.whole(event)


def bridge(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[Any], None]:
    """The engine's `on_event` (called from its thread): puts each event on `events` in `loop`'s thread."""

    def on_event(event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop has closed (the server is stopping): nobody waits for this event
            pass

    return on_event


async def read_body(request: fastapi.Request, limit: int) -> bytes:
    """The raw body, or ApiError 413 as soon as it is known to exceed `limit` bytes (never reading past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {int(declared)} bytes, over this server's limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes")
    return bytes(body)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(parsed).__name__}")
    return parsed


def refuse_unsupported(body: Mapping[str, Any]) -> None:
    for field, neutral in UNSUPPORTED.items():
        if field in body and body[field] not in neutral:
            raise ApiError(400, f"{field}={body[field]!r} is not supported by this server; leave it out", field)


def chat_messages(body: Mapping[str, Any]) -> tuple[dict[str, str], ...]:
    """The conversation as plain {"role", "content"} dicts (text parts joined by newlines), ending with a user's."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {'role': ..., 'content': ...} objects", "messages")
    plain = tuple(plain_message(message, index) for index, message in enumerate(messages))
    if plain[-1]["role"] != "user":
        raise ApiError(400, f"the last message must be the user's, got role {plain[-1]['role']!r}", "messages")
    return plain


def plain_message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"message {index} must be an object with 'role' and 'content', got {message!r}", param)
    role, content = message.get("role"), message.get("content")
    if role not in templates.ROLES:
        raise ApiError(400, f"message {index} has role {role!r}; the role must be one of {templates.ROLES}",
                       f"{param}.role")  # fmt: skip
    if isinstance(content, list) and content and all(is_text_part(part) for part in content):
        content = "\n".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ApiError(400, f"message {index} has content {content!r}; the content must be a string or a list "
                       "of {'type': 'text', 'text': ...} parts", f"{param}.content")  # fmt: skip
    return {"role": role, "content": content}


def is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def session_id(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The session named by the body's `session_id` or the X-Session-Id header (both: they must agree)."""
    named, header = body.get("session_id"), headers.get(SESSION_HEADER)
    if named is not None and not isinstance(named, str):
        raise ApiError(400, f"session_id must be a string, got {named!r}", "session_id")
    if named is not None and header is not None and named != header:
        raise ApiError(400, f"session_id {named!r} and the X-Session-Id header {header!r} differ; send one",
                       "session_id")  # fmt: skip
    return named if named is not None else header


def sampling_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The engine.Request fields shared by both completions, checked; absent or null fields keep their default."""
    if body.get("n") is not None and (not is_int(body["n"]) or body["n"] != 1):
        raise ApiError(400, f"n must be 1 (one reply per request), got {body['n']!r}", "n")
    fields = {"max_tokens": max_tokens(body)}
    for name, low_included in (("temperature", True), ("top_p", False)):
        if body.get(name) is not None:
            fields[name] = number_in(body, name, 0.0, 2.0 if name == "temperature" else 1.0, low_included)
    if body.get("seed") is not None:
        if not is_int(body["seed"]):
            raise ApiError(400, f"seed must be an integer, got {body['seed']!r}", "seed")
        fields["seed"] = body["seed"]
    fields["stop"] = stop_strings(body.get("stop"))
    return fields


def number_in(body: Mapping[str, Any], name: str, low: float, high: float, low_included: bool) -> float:
    """body[name] as a float in [low, high] (or (low, high] unless `low_included`), else ApiError 400."""
    value = body[name]
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not (low <= value if low_included else low < value) or not value <= high:
        raise ApiError(400, f"{name} must be a number in {'[' if low_included else '('}{low}, {high}], got {value!r}",
                       name)  # fmt: skip
    return float(value)


def max_tokens(body: Mapping[str, Any]) -> int | None:
    """`max_completion_tokens` or `max_tokens` (both: they must agree): an integer >= 1, or None."""
    given = {name: body[name] for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None}
    if len(set(given.values())) > 1:
        raise ApiError(400, f"max_completion_tokens and max_tokens differ ({given}); send one", "max_tokens")
    for name, value in given.items():
        if not is_int(value) or value < 1:
            raise ApiError(400, f"{name} must be an integer >= 1, got {value!r}", name)
        return value
    return None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def stop_strings(stop: Any) -> tuple[str, ...]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
    return tuple(stops)


def streaming(body: Mapping[str, Any]) -> dict[str, bool]:
    """{"stream", "include_usage"}: OpenAI's `stream` and `stream_options.include_usage`."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    include_usage = options.get("include_usage", False) if isinstance(options, dict) else options
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, f"stream_options must be {{'include_usage': true | false}}, got {options!r}",
                       "stream_options")  # fmt: skip
    return {"stream": bool(stream), "include_usage": bool(include_usage)}


@dataclasses.dataclass(frozen=True)
class Shape:
    """The response objects of one request: OpenAI's chat (`kind` "chat") or text completion ("text") shapes."""

    kind: str
    model: str
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def envelope(self, chunk: bool) -> dict[str, Any]:
        chat = self.kind == "chat"
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{self.id}", "object": kind, "created": self.created,
                "model": self.model, "system_fingerprint": None}  # fmt: skip

    def choice(self, text: str | None, finish_reason: str | None, chunk: bool, role: bool = False) -> dict[str, Any]:
        """One choice: a delta (`chunk`; with the role on the first) or the whole message or text."""
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        content = {"role": "assistant"} if role or not chunk else {}
        if text is not None:
            content["content"] = text
        return {"index": 0, "delta" if chunk else "message": content, "logprobs": None, "finish_reason": finish_reason}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False, **extra) -> dict:
        return {**self.envelope(True), "choices": [self.choice(text, finish_reason, True, role)], **extra}

    def whole(self, finished: engine_lib.Finished) -> dict[str, Any]:
        choice = self.choice(finished.text, finished.finish_reason, chunk=False)
        return {**self.envelope(False), "choices": [choice], "usage": usage(finished), "session": finished.session}


def usage(finished: engine_lib.Finished) -> dict[str, int]:
    prompt, completion = finished.prompt_tokens, finished.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def server_sent(data: Mapping[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def event_stream(shape: Shape, events: asyncio.Queue, ticket, timing: Timing, include_usage: bool):
    """The server-sent events of a streamed reply; the ticket is cancelled if the stream ends early (the
    client went away: Starlette cancels this generator) or fails."""
    ended = False
    usage_field = {"usage": None} if include_usage else {}
    try:
        if shape.kind == "chat":
            yield server_sent(shape.chunk("", role=True, **usage_field))
        while not ended:
            event = await events.get()
            ended = not isinstance(event, engine_lib.TextDelta)
            if isinstance(event, engine_lib.TextDelta):
                timing.token()
                yield server_sent(shape.chunk(event.text, **usage_field))
            elif isinstance(event, engine_lib.Finished):
                timing.finish()
                final_text = "" if shape.kind == "text" else None
                yield server_sent(shape.chunk(final_text, event.finish_reason, session=event.session, **usage_field))
                if include_usage:
                    yield server_sent({**shape.envelope(True), "choices": [], "usage": usage(event),
                                       "session": event.session})  # fmt: skip
            else:
                message = f"the engine failed on this request: {event.message}"
                yield server_sent({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
        yield server_sent("[DONE]")
    finally:
        if not ended:
            ticket.cancel()


async def whole_reply(request: fastapi.Request, events: asyncio.Queue, ticket, timing: Timing):
    """The Finished or Failed event of a whole (not streamed) reply; None, with the ticket cancelled, if
    the client goes away first."""
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while True:
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait({next_event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not next_event.done():
                next_event.cancel()
                ticket.cancel()
                return None
            event = next_event.result()
            if isinstance(event, engine_lib.TextDelta):
                timing.token()
                continue
            if isinstance(event, engine_lib.Finished):
                timing.finish()
            return event
    finally:
        gone.cancel()


async def disconnected(request: fastapi.Request) -> None:
    """Returns once the client has gone (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Timing:
    """Observes a request's time to first token and duration, from its submission to the engine."""

    def __init__(self, metrics: Metrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.start = time.perf_counter()
        self.first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.start
            self.metrics.time_to_first_token.labels(self.endpoint).observe(self.first_token)

    def finish(self) -> None:
        self.token()  # a reply without text: its first token was its end
        self.metrics.request_duration.labels(self.endpoint).observe(time.perf_counter() - self.start)


class Metrics:
    """The app's own Prometheus registry: the engine's numbers read at each scrape, and the server's own."""

    def __init__(self, engine):
        self.engine = engine
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(self)
        self.responses = prometheus_client.Counter(
            "streamjax_http_responses", "HTTP responses by route and status", ["path", "status"], registry=self.registry
        )
        self.time_to_first_token = prometheus_client.Histogram(
            "streamjax_time_to_first_token_seconds", "From a request's submission to its first token",
            ["endpoint"], buckets=SECONDS_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.request_duration = prometheus_client.Histogram(
            "streamjax_request_duration_seconds", "From a request's submission to its last token",
            ["endpoint"], buckets=SECONDS_BUCKETS, registry=self.registry,
        )  # fmt: skip

    def describe(self) -> list:
        return []  # nothing to check at registration: the engine's names are read at each scrape

    def collect(self):
        """The engine's metrics: names ending in _total as counters, the rest as gauges."""
        for name, value in self.engine.metrics().items():
            documentation = ENGINE_METRICS_HELP.get(name, f"engine.metrics()[{name!r}]")
            family = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            yield family(f"streamjax_{name}", documentation, value=value)

    def response(self) -> fastapi.Response:
        return fastapi.Response(prometheus_client.generate_latest(self.registry),
                                media_type=prometheus_client.CONTENT_TYPE_LATEST)  # fmt: skip


class Guard:
    """ASGI middleware around every route: counts responses by route and status, and turns an unexpected
    exception into a 500 error object (logged with its traceback), so no request can stop the server."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: list[int] = []

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                self.metrics.responses.labels(route_path(scope), str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception as error:  # noqa: BLE001 -- the server must outlive any request
            logger.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not status:
                response = ApiError(500, f"internal error: {type(error).__name__}: {error}").response()
                await response(scope, receive, send_counted)


def route_path(scope: Mapping[str, Any]) -> str:
    """The route's path template (or "unknown"), so that metrics' labels stay few."""
    route = scope.get("route")
    return getattr(route, "path", "unknown")
