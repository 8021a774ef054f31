"""Continuous batching of chat sessions: B slots of one batched sink cache, one decode program for all.

Letters: B slots.

A **session** is a conversation a client names (`Request.session_id`); it owns one slot's stream of
the batched cache while it is resident, and a file in `session_dir` while it is not. A request for a
session feeds only what is new since the session's last turn: the client sends the whole
conversation (OpenAI's shape), the engine checks that it starts with what the session holds (the
messages and the replies as they were returned) and feeds the rest through the model's chat template
(`chat.messages_input`). A conversation that disagrees with the session's, or a session the engine
does not know, is answered from a fresh stream (`Finished.session` says "restarted" or "new"), never
mixed. A request without a session is one-shot: its stream is dropped when its reply ends.

The engine's thread runs the loop: admit queued requests into slots (a request's prompt is fed
into its slot by `generation.start` on that slot's stream alone, exactly as the chat library feeds
one conversation), then one `generation.decode_block` of `block_size` steps for every slot that is
generating, the idle slots finished and untouched (`num_valid` 0). A new request is therefore
prefilled between two blocks while the others keep their place, and a slot is free for the next
request as soon as its reply ends. Each slot has its own sampling settings, `max_tokens` and
stop-string automaton (`stopping.per_stream_stop_strings`, padded to fixed sizes), all arrays, so
one compiled decode program serves every mix of requests.

When every slot is taken and a request needs one, the least recently used idle session is saved to
its file (`streamjax.files.sessions`: atomic, with a digest) and its slot given to the request; a
request for a saved session loads it back. So the number of sessions is bounded by disk, not by
device memory, and `close` saves every resident session, so a restarted server continues them.
A client that goes away mid-reply (`Ticket.cancel`) frees its slot; the session is dropped from memory
(its file, if any, still holds it as it was before that turn).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import pathlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from streamjax.files import sessions as session_files
from streamjax.model.cache import check_cache_shape, init_cache
from streamjax.stream import chat, generation, sampling, stopping, templates
from streamjax.stream.token_bytes import pack_token_bytes, token_bytes

FINISH_REASONS = {"end_id": "stop", "stop_string": "stop", "max_new_tokens": "length"}  # OpenAI's names


@dataclasses.dataclass(frozen=True)
class Request:
    """One request: a chat (`messages`, the whole conversation ending with a user message) or a
    completion (`prompt`, raw text), exactly one of them; `session_id` for a chat only."""

    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    session_id: str | None = None
    max_tokens: int | None = None  # None: the engine's default_max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # None: the engine's seed
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """Text the reply adds (end ids hidden, text that may begin a stop string held back)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """The reply is complete. `session`: "new", "continued", "restarted" (the client's conversation
    disagreed with the session's, so a fresh stream answered it) or None (one-shot)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    session: str | None


@dataclasses.dataclass(frozen=True)
class Failed:
    """The request could not be served (e.g. the chat template refuses the conversation)."""

    message: str


Event = TextDelta | Finished | Failed


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """slots: B streams decoded together; num_sinks + window: each stream's cache; session_dir: where
    idle sessions go; default_max_tokens / max_tokens_limit: a reply's length when the request names
    none / the most a request may ask; seed: the draws of a request without one; chunk_size: prompt
    tokens per forward pass; block_size: decode steps per dispatch; max_stop_strings and
    max_stop_bytes: the stop strings a request may give (their automaton's fixed size)."""

    slots: int = 8
    num_sinks: int = 4
    window: int = 1020
    session_dir: str = "sessions"
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    seed: int = 0
    chunk_size: int = 64  # as configs/serve.py: a turn's prompt is short and a chunk is computed whole
    block_size: int = 8
    max_stop_strings: int = 4
    max_stop_bytes: int = 64

    def check(self) -> None:
        """ValueError naming the first field out of range."""
        check_cache_shape(self.num_sinks, self.window)
        for name in ("slots", "chunk_size", "block_size", "max_stop_strings", "max_stop_bytes", "max_tokens_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens must be in [0, max_tokens_limit={self.max_tokens_limit}], "
                f"got {self.default_max_tokens!r}"
            )
        sampling.sampling_settings(1, seed=self.seed)


class Ticket:
    """A submitted request; `cancel()` (its client went away) ends it and frees its slot."""

    def __init__(self, request: Request, on_event: Callable[[Event], None]):
        self.request, self.on_event, self.cancelled = request, on_event, False

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass
class _Session:
    """A resident stream: its conversation (cache-side messages; the cache is the slot's) and the
    conversation as the client sees it (replies as returned)."""

    name: str | None
    messages: list[dict[str, str]]
    reply_text: str
    client_messages: list[dict[str, str]]


@dataclasses.dataclass
class _Reply:
    """A slot's reply in progress."""

    ticket: Ticket
    session: _Session
    status: str | None
    new_messages: list[dict[str, str]]
    prompt_tokens: int
    text: chat.ReplyText
    ids: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0


class Engine:
    """Serves chat and completion requests over `settings.slots` streams of one model (see the module)."""

    def __init__(self, model: chat.ChatModel, settings: EngineSettings):
        settings.check()
        self.model, self.settings = model, settings
        self.dtype = jax.tree.leaves(model.params)[0].dtype
        self.end_of_turn = chat.end_of_turn_id(model)
        self._empty = init_cache(model.config, 1, settings.num_sinks, settings.window, self.dtype)
        batch = settings.slots
        self._state = self._idle_slots()
        self._sampling = sampling.sampling_settings(batch, temperature=0.0)
        try:
            table, self._no_stop_strings = token_bytes(model.tokenizer, model.config.vocab_size), None
        except ValueError as error:  # a tokenizer whose tokens' bytes are unknown: requests get no stop strings
            table, self._no_stop_strings = pack_token_bytes([b""]), str(error)
        self._stops = stopping.StopConditions(
            jnp.asarray(sorted(model.end_ids) or [-1], jnp.int32),
            jnp.zeros((batch,), jnp.int32),
            self._stop_automata([()] * batch),
            table,
        )
        self._sessions: list[_Session | None] = [None] * batch  # by slot
        self._replies: list[_Reply | None] = [None] * batch
        self._recent: collections.OrderedDict[str, int] = collections.OrderedDict()  # resident name -> slot, LRU first
        self._queue: collections.deque[Ticket] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._counts = collections.Counter()

    # ------------------------------------------------------------------ the public surface

    def start(self) -> None:
        """Start the engine's thread (programs compile on the first requests)."""
        self._thread = threading.Thread(target=self._run, name="streamjax-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; requests still waiting or generating get `Failed`; resident sessions are saved."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        for slot, session in enumerate(self._sessions):  # a session mid-reply keeps its file as before the turn
            if session is not None and session.name is not None and self._replies[slot] is None:
                self._save(slot, session)
        for ticket in [*self._queue, *(reply.ticket for reply in self._replies if reply is not None)]:
            ticket.on_event(Failed("the server is shutting down"))
        self._queue.clear()

    def check(self, request: Request) -> None:
        """ValueError naming what this engine cannot serve in `request`, before it is queued."""
        if (request.messages is None) == (request.prompt is None):
            raise ValueError("a request has either messages (a chat) or a prompt (a completion), exactly one")
        if request.messages is not None:
            messages = templates.validate_messages(request.messages)
            if not messages or messages[-1]["role"] != "user":
                raise ValueError("the conversation must end with a user message")
        elif request.session_id is not None:
            raise ValueError("sessions are for chat completions; a completion is one-shot")
        elif not request.prompt:
            raise ValueError("the prompt is empty")
        if request.session_id is not None:
            session_files.session_path(self.settings.session_dir, request.session_id)
        self._check_limits(request)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Ticket:
        """Queue `request` (checked first: ValueError); `on_event` gets its events from the engine's thread."""
        self.check(request)
        ticket = Ticket(request, on_event)
        with self._wake:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self._queue.append(ticket)
            self._counts["requests_total"] += 1
            self._wake.notify_all()
        return ticket

    def metrics(self) -> dict[str, int]:
        """Counts for monitoring: sessions resident and saved, slots busy, queued requests, token totals."""
        saved = len(list(_session_dir(self.settings).glob("*" + session_files.SESSION_SUFFIX)))
        return {
            "sessions_resident": len(self._recent),
            "sessions_saved": saved,
            "slots_busy": sum(reply is not None for reply in self._replies),
            "queue_length": len(self._queue),
            "requests_total": self._counts["requests_total"],
            "prompt_tokens_total": self._counts["prompt_tokens_total"],
            "completion_tokens_total": self._counts["completion_tokens_total"],
        }

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._queue and not any(self._replies):
                    self._wake.wait()
                if self._closing:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if any(self._replies):
                    self._decode()
            except Exception as error:  # noqa: BLE001 - the server never dies from a request
                self._reset(error)

    def _reset(self, error: Exception) -> None:
        """After an unexpected error: fail every reply in progress and start again from empty slots (the
        resident sessions are dropped; their files keep them as they were last saved)."""
        for reply in self._replies:
            if reply is not None:
                reply.ticket.on_event(Failed(_describe(error)))
        self._replies, self._sessions = [None] * self.settings.slots, [None] * self.settings.slots
        self._recent.clear()
        self._state = self._idle_slots()

    def _idle_slots(self) -> generation.DecodeState:
        """Every slot empty and idle."""
        slots, num_sinks, window = self.settings.slots, self.settings.num_sinks, self.settings.window
        return _idle_state(init_cache(self.model.config, slots, num_sinks, window, self.dtype))

    def _admit(self) -> None:
        """Give queued requests slots, first come first served, skipping those whose session is busy."""
        with self._wake:
            waiting = list(self._queue)
        for ticket in waiting:
            slot = self._slot_for(ticket.request)
            if slot is None:
                continue
            with self._wake:
                self._queue.remove(ticket)
            try:
                self._begin(ticket, slot)
            except Exception as error:  # noqa: BLE001 - the request fails, the server goes on
                self._replies[slot] = None
                self._release(slot, keep_session=False)
                ticket.on_event(Failed(_describe(error)))

    def _slot_for(self, request: Request) -> int | None:
        """The slot `request` runs in (its session's, a free one, or the LRU idle session's after
        saving it), or None while none can be had."""
        name = request.session_id
        if name is not None and name in self._recent:
            slot = self._recent[name]
            return None if self._replies[slot] is not None else slot
        free = [slot for slot, session in enumerate(self._sessions) if session is None]
        if free:
            return free[0]
        for slot in list(self._recent.values()):  # least recently used first
            if self._replies[slot] is None:
                self._save(slot, self._sessions[slot])
                self._release(slot, keep_session=False)
                return slot
        return None

    def _begin(self, ticket: Ticket, slot: int) -> None:
        """Place the request's session in `slot`, feed what is new and sample the first token."""
        request = ticket.request
        session, status, new_messages = self._session_for(request, slot)
        if request.messages is not None:
            conversation = chat.Conversation(None, session.messages, session.reply_text)
            inputs = chat.messages_input(self.model, conversation, new_messages)
        else:
            inputs = list(self.model.tokenizer(request.prompt).input_ids)
        one_settings = self._sampling_of(request)
        max_tokens = self.settings.default_max_tokens if request.max_tokens is None else request.max_tokens
        one_stops = self._stops.replace(
            max_new_tokens=jnp.asarray([max_tokens], jnp.int32), strings=self._stop_automata([request.stop])
        )
        cache = _take_row(self._state.cache, slot)
        one, _, _ = generation.start(
            self.model.params, cache, [inputs], self.model.config, one_settings, one_stops, self.settings.chunk_size
        )
        self._state = _put_row(self._state, slot, one)
        self._sampling = _put_row(self._sampling, slot, one_settings)
        self._stops = self._stops.replace(
            max_new_tokens=self._stops.max_new_tokens.at[slot].set(max_tokens),
            strings=_put_row(self._stops.strings, slot, one_stops.strings),
        )
        text = chat.ReplyText(self.model.tokenizer, hidden_ids=self.model.end_ids)
        reply = _Reply(ticket, session, status, new_messages, len(inputs), text)
        self._replies[slot] = reply
        self._counts["prompt_tokens_total"] += len(inputs)
        # The first token is final for a one-token reply, yet the decode loop still has to feed it: the reply
        # ends when its stream is finished (at once only with max_tokens 0).
        self._emit(slot, [int(one.pending[0])] if int(one.generated[0]) else [], bool(one.finished[0]))

    def _session_for(self, request: Request, slot: int) -> tuple[_Session, str | None, list[dict[str, str]]]:
        """(the session in `slot`, its status, the messages to feed) for `request`; a fresh stream unless
        the request continues the session resident there or saved on disk."""
        messages = [dict(message) for message in request.messages or ()]
        name = request.session_id
        session = self._sessions[slot] if name is not None and name in self._recent else None
        if session is None and name is not None:
            session = self._load(slot, name)
        if session is not None:
            known = session.client_messages
            if len(messages) > len(known) and messages[: len(known)] == known:
                self._touch(name, slot)
                return session, "continued", messages[len(known) :]
        self._release(slot, keep_session=False)
        self._state = _put_row(self._state, slot, self._empty_state())
        fresh = _Session(name, [], "", [])
        self._sessions[slot] = fresh
        if name is not None:
            self._touch(name, slot)
        status = None if name is None else ("new" if session is None else "restarted")
        return fresh, status, messages

    def _decode(self) -> None:
        """One block of decode steps for every generating slot; their new tokens go to their requests."""
        self._state, block, mask = generation.decode_block(
            self.model.params, self._state, self.model.config, self._sampling, self._stops, self.settings.block_size
        )
        finished = np.asarray(self._state.finished)
        for slot, reply in enumerate(self._replies):
            if reply is not None:
                self._emit(slot, block[slot][mask[slot]].tolist(), bool(finished[slot]))

    def _emit(self, slot: int, ids: list[int], finished: bool) -> None:
        """Hand a slot's new tokens to its request as text; on its last, finish the reply."""
        reply = self._replies[slot]
        reply.ids.extend(ids)
        reply.text.add(ids)
        text = self._visible(reply, final=finished, at_stop_string=finished and self._reason(slot) == "stop_string")
        if len(text) > reply.sent:
            reply.ticket.on_event(TextDelta(text[reply.sent :]))
            reply.sent = len(text)
        if finished:
            self._finish(slot, reply, text)

    def _reason(self, slot: int) -> str | None:
        return stopping.REASONS[int(self._state.reason[slot])]

    def _visible(self, reply: _Reply, final: bool, at_stop_string: bool) -> str:
        """The reply's text a client may see: cut before its stop string when one ended it, and while
        it goes on without the tail that could be the start of one (or of a UTF-8 character)."""
        text, stops = reply.text.text.rstrip("\ufffd") if not final else reply.text.text, reply.ticket.request.stop
        cuts = [text.find(stop) for stop in stops if stop in text]
        if cuts and (at_stop_string or not final):  # the token that completes a stop string is its stream's last
            return text[: min(cuts)]
        if final:
            return text
        held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return text[: len(text) - held]

    def _finish(self, slot: int, reply: _Reply, text: str) -> None:
        reason = self._reason(slot)
        session = reply.session
        if reply.ticket.request.messages is not None:
            written = chat.decode_text(self.model.tokenizer, reply.ids)
            closed = reason == "end_id" and reply.ids[-1] == self.end_of_turn
            content = reply.text.text if closed else written
            session.messages = [*session.messages, *reply.new_messages, {"role": "assistant", "content": content}]
            session.reply_text = written
            request_messages = [dict(message) for message in reply.ticket.request.messages]
            session.client_messages = [*request_messages, {"role": "assistant", "content": text}]
        self._counts["completion_tokens_total"] += len(reply.ids)
        self._replies[slot] = None
        if session.name is None:
            self._release(slot, keep_session=False)
        event = Finished(text, FINISH_REASONS.get(reason, "stop"), reply.prompt_tokens, len(reply.ids), reply.status)
        reply.ticket.on_event(event)

    def _drop_cancelled(self) -> None:
        with self._wake:
            for ticket in [ticket for ticket in self._queue if ticket.cancelled]:
                self._queue.remove(ticket)
        for slot, reply in enumerate(self._replies):
            if reply is not None and reply.ticket.cancelled:
                self._replies[slot] = None
                self._state = self._state.replace(finished=self._state.finished.at[slot].set(True))
                self._release(slot, keep_session=False)

    # ------------------------------------------------------------------ slots and session files

    def _release(self, slot: int, keep_session: bool) -> None:
        session = self._sessions[slot]
        if session is not None and session.name is not None and not keep_session:
            self._recent.pop(session.name, None)
        if not keep_session:
            self._sessions[slot] = None

    def _touch(self, name: str, slot: int) -> None:
        self._recent[name] = slot
        self._recent.move_to_end(name)

    def _save(self, slot: int, session: _Session) -> None:
        conversation = chat.Conversation(_take_row(self._state.cache, slot), session.messages, session.reply_text)
        path = session_files.session_path(_session_dir(self.settings), session.name)
        session_files.save_conversation(path, self.model, conversation, {"client_messages": session.client_messages})

    def _load(self, slot: int, name: str) -> _Session | None:
        """The session saved under `name`, its cache put in `slot`; None if there is none."""
        path = session_files.session_path(_session_dir(self.settings), name)
        if not path.exists():
            return None
        conversation, extra = session_files.load_conversation(path, self.model)
        self._state = _put_row(self._state, slot, self._empty_state().replace(cache=conversation.cache))
        session = _Session(name, conversation.messages, conversation.reply_text, extra["client_messages"])
        self._sessions[slot] = session
        return session

    def _empty_state(self) -> generation.DecodeState:
        return _idle_state(self._empty)

    def _stop_automata(self, per_stream: Sequence[Sequence[str]]) -> stopping.StopStrings:
        strings = 0 if self._no_stop_strings else self.settings.max_stop_strings
        return stopping.per_stream_stop_strings(per_stream, strings * self.settings.max_stop_bytes + 1, strings)

    def _check_limits(self, request: Request) -> None:
        limit = self.settings.max_tokens_limit
        if request.max_tokens is not None and not (0 <= request.max_tokens <= limit):
            raise ValueError(f"max_tokens must be in [0, {limit}], got {request.max_tokens!r}")
        if request.stop and self._no_stop_strings:
            raise ValueError(f"this model takes no stop strings: {self._no_stop_strings}")
        if len(request.stop) > self.settings.max_stop_strings:
            raise ValueError(f"at most {self.settings.max_stop_strings} stop strings, got {len(request.stop)}")
        for stop in request.stop:
            if not isinstance(stop, str) or not stop or len(stop.encode()) > self.settings.max_stop_bytes:
                raise ValueError(f"a stop string must be 1 to {self.settings.max_stop_bytes} bytes, got {stop!r:.80}")
        self._sampling_of(request)

    def _sampling_of(self, request: Request) -> sampling.SamplingSettings:
        """The request's sampling settings, as one stream's (ValueError for a value out of range)."""
        seed = self.settings.seed if request.seed is None else request.seed
        return sampling.sampling_settings(1, temperature=request.temperature, top_p=request.top_p, seed=seed)


def _describe(error: Exception) -> str:
    """A failed request's message: a user error's own, anything else logged and named as internal."""
    if isinstance(error, ValueError | OSError):
        return str(error)
    logging.exception("streamjax engine: unexpected error")
    return f"internal error: {type(error).__name__}: {error}"


def _idle_state(cache) -> generation.DecodeState:
    """The decode state of streams that generate nothing (finished), over `cache`."""
    done, zeros = lambda: jnp.ones((cache.batch_size,), bool), lambda: jnp.zeros((cache.batch_size,), jnp.int32)
    return generation.DecodeState(
        cache, zeros(), zeros(), done(), done(), zeros(), zeros()
    )  # distinct buffers: donated


def _session_dir(settings: EngineSettings) -> pathlib.Path:
    return pathlib.Path(settings.session_dir)


@functools.partial(jax.jit, donate_argnums=0)
def _put_row(batched: Any, slot: jax.Array, row: Any) -> Any:
    """`batched` (a pytree of [B, ...] arrays) with row `slot` replaced by `row`'s only row."""
    put = lambda whole, one: jax.lax.dynamic_update_slice_in_dim(whole, one.astype(whole.dtype), slot, axis=0)
    return jax.tree.map(put, batched, row)


@jax.jit
def _take_row(batched: Any, slot: jax.Array) -> Any:
    """Row `slot` of a pytree of [B, ...] arrays, as a batch of one."""
    return jax.tree.map(lambda whole: jax.lax.dynamic_slice_in_dim(whole, slot, 1, axis=0), batched)
