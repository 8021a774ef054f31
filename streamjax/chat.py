"""Endless multi-turn chat in constant memory: a conversation is one stream's cache and what was said.

Each turn feeds the cache only what the turn adds to the conversation as the model's own chat
template renders it (the end of the previous reply as the template writes it, the user's message and
the generation prompt), then generates the reply into the same cache (`streamjax.generation`), so the
cache holds, turn after turn, each turn's input tokens followed by its reply tokens. The first tokens
of the conversation (the template's system prompt) are the sinks; the rest is a rolling window, so the
conversation can go on for ever at the memory and cost of S + W cached tokens.

`ChatModel` is what stays fixed (weights, tokenizer, template, end ids); `Conversation` is the state
that goes into a turn and comes out of it (`chat_turn`), with a `Turn` record of what happened.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from streamjax import chat_template, generation, loading, sampling, sharding, stopping
from streamjax.cache import SinkCache, init_cache
from streamjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ChatModel:
    """A model ready to chat: weights, tokenizer, chat template and the ids that end a reply."""

    spec: str
    config: ModelConfig
    params: dict
    tokenizer: Any
    template: chat_template.ChatTemplate
    end_ids: frozenset[int]
    mesh: Any = None


def load_chat_model(spec: str, dtype="float32", mesh=None, template_file: str | None = None) -> ChatModel:
    """Load a model to chat with (see `loading.load_model`); the template is checked before the weights
    are read: a model without one raises `chat_template.MissingChatTemplateError` saying how to give one."""
    source = loading.resolve_model(spec)
    template = chat_template.load_chat_template(source, template_file)
    tokenizer = loading.load_tokenizer(source)
    if tokenizer is None:
        raise ValueError(f"model {spec!r} has no tokenizer files, so it cannot read or write text")
    config, params = loading.load_weights(source, loading.parse_dtype(dtype), mesh)
    return ChatModel(spec, config, params, tokenizer, template, stopping.eos_token_ids(source, template), mesh)


@dataclasses.dataclass
class Conversation:
    """One conversation: its cache (a single stream) and its messages as the template renders them.

    `reply_text` is the text the last reply's tokens decode to (its end id included): the part of the
    template's rendering that is already in the cache when the next turn comes.
    """

    cache: SinkCache
    messages: list[dict[str, str]]
    reply_text: str = ""

    @property
    def turns(self) -> int:
        return sum(message["role"] == "assistant" for message in self.messages)


def new_conversation(model: ChatModel, num_sinks: int, window: int, system_prompt: str = "") -> Conversation:
    """An empty conversation with a cache of S + W slots in the params' dtype (on the model's mesh)."""
    dtype = jax.tree.leaves(model.params)[0].dtype
    cache = init_cache(model.config, 1, num_sinks, window, dtype)
    if model.mesh is not None:
        cache = sharding.shard_cache(cache, model.mesh)
    return Conversation(cache, [{"role": "system", "content": system_prompt}] if system_prompt else [])


@dataclasses.dataclass
class Turn:
    """What one turn did; `input_token_ids` then `reply_token_ids` is exactly what it added to the cache."""

    turn: int
    user: str
    reply: str
    input_token_ids: list[int]
    reply_token_ids: list[int]
    finish_reason: str | None
    stream_position: int
    cache_fill: int
    cache_capacity: int
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def turn_input(model: ChatModel, conversation: Conversation, user_message: str) -> list[int]:
    """Token ids a turn feeds before generating: what the template adds for `user_message` after the
    conversation so far, less the part of it the last reply already put in the cache."""
    user = {"role": "user", "content": user_message}
    if not conversation.messages or conversation.messages[-1]["role"] != "assistant":
        text = chat_template.render(model.template, [*conversation.messages, user], add_generation_prompt=True)
    else:
        *history, reply = conversation.messages
        text = chat_template.turn_text(model.template, history, [reply, user], True, history_prompted=True)
        if not text.startswith(conversation.reply_text):
            raise ValueError(
                f"the chat template ({model.template.origin}) writes the last reply as {text[:80]!r}..., not as "
                f"the model generated it ({conversation.reply_text[:80]!r}...), so the cache and the conversation "
                "would differ"
            )
        text = text[len(conversation.reply_text) :]
    return list(model.tokenizer(text, add_special_tokens=False).input_ids)


def end_of_turn_id(model: ChatModel) -> int:
    """The id that closes an assistant turn as the model's chat template writes it: the end id whose
    token the template writes first after a reply's content (ChatML: <|im_end|>), whitespace before it
    skipped. Every turn is closed with it (`chat_turn`, `dialogue`, `streameval`); a reply that stops on
    another end id (a model's <|endoftext|>) keeps that id, and the template's one follows it.
    Raises ValueError when none of the model's end ids closes a turn in its template."""
    after = chat_template.text_after_reply(model.template).lstrip()
    texts = {end_id: _decode(model.tokenizer, [end_id]) for end_id in model.end_ids}
    closing = [end_id for end_id, text in texts.items() if text and after.startswith(text)]
    if not closing:
        raise ValueError(
            f"none of the model's end ids {sorted(model.end_ids)} closes an assistant turn in its chat template "
            f"({model.template.origin}), which writes {after[:40]!r} after a reply; give a template that ends a "
            f"reply with one of them ({chat_template.TEMPLATE_OPTION})"
        )
    return max(closing, key=lambda end_id: len(texts[end_id]))


def chat_turn(
    model: ChatModel,
    conversation: Conversation,
    user_message: str,
    settings: sampling.SamplingSettings,
    stops: stopping.StopConditions,
    *,
    on_text: Callable[[str], None] | None = None,
    chunk_size: int = 256,
    block_size: int = 16,
) -> tuple[Conversation, Turn]:
    """One turn: feed the user's message, generate the reply (passing its text to `on_text` as it
    comes), and return the conversation after it (its cache donated) and the turn's record."""
    chat_template.validate_messages([{"role": "user", "content": user_message}])
    inputs = turn_input(model, conversation, user_message)
    printer = _TextPrinter(model.tokenizer, on_text, hidden_ids=model.end_ids)
    result = generation.generate(
        model.params, conversation.cache, [inputs], model.config, settings, stops,
        chunk_size=chunk_size, block_size=block_size, on_tokens=printer,
    )  # fmt: skip
    reply_ids = result.tokens[0].tolist()
    ended = result.reasons[0] == "end_id"
    reply = _decode(model.tokenizer, reply_ids[:-1] if ended else reply_ids)
    written = _decode(model.tokenizer, reply_ids)
    # The message is the reply as the cache holds it up to the template's end of turn: an end id that
    # is not the template's (stays in the cache) stays in the message, and the next turn closes it.
    closed = ended and reply_ids[-1] == end_of_turn_id(model)
    messages = [
        *conversation.messages,
        {"role": "user", "content": user_message},
        {"role": "assistant", "content": reply if closed else written},
    ]
    after = Conversation(result.cache, messages, written)
    return after, _turn_record(after, user_message, reply, inputs, reply_ids, result)


def _turn_record(conversation, user, reply, inputs, reply_ids, result: generation.GenerationResult) -> Turn:
    stats, cache = result.stats, conversation.cache
    prefill_steady = stats["prefill_seconds"] - stats["prefill_compile_seconds"]
    decode_steady = stats["decode_seconds"] - stats["decode_compile_seconds"]
    return Turn(
        turn=conversation.turns, user=user, reply=reply, input_token_ids=inputs, reply_token_ids=reply_ids,
        finish_reason=result.reasons[0], stream_position=int(cache.next_position[0]),
        cache_fill=int(cache.length[0]), cache_capacity=cache.capacity,
        prefill_tokens_per_second=len(inputs) / prefill_steady if prefill_steady > 0 else float("nan"),
        decode_tokens_per_second=max(len(reply_ids) - 1, 0) / decode_steady if decode_steady > 0 else float("nan"),
        prefill_seconds=stats["prefill_seconds"], decode_seconds=stats["decode_seconds"],
        compile_seconds=stats["prefill_compile_seconds"] + stats["decode_compile_seconds"],
    )  # fmt: skip


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


class _TextPrinter:
    """`generate`'s `on_tokens` for one stream: hands `on_text` the reply's new text block by block,
    holding back an incomplete UTF-8 character until its last byte arrives. `hidden_ids` (the end
    ids, which end the reply) are not shown, so the text shown is the reply's content."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, hidden_ids: Collection[int] = ()):
        self.tokenizer, self.on_text, self.hidden, self.ids, self.shown = tokenizer, on_text, hidden_ids, [], 0

    def __call__(self, new: list[np.ndarray]) -> None:
        if self.on_text is None:
            return
        self.ids.extend(token for token in new[0].tolist() if token not in self.hidden)
        text = _decode(self.tokenizer, self.ids).rstrip("\ufffd")
        if len(text) > self.shown:
            self.on_text(text[self.shown :])
            self.shown = len(text)


def read_script(path: str) -> tuple[str, list[str]]:
    """(system prompt or "", user messages) of a script: a .txt file (one user turn per non-empty line)
    or a .jsonl file of {"role": "user" | "system", "content": str} records (a system one first only)."""
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"chat script {file} does not exist")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number} is not a JSON record: {error}") from None
        return _script_turns(records, file)
    if file.suffix != ".txt":
        raise ValueError(f"chat script {file} must be a .txt file (one user turn per line) or a .jsonl file")
    return "", lines


def _script_turns(records: list[Mapping], file) -> tuple[str, list[str]]:
    messages = chat_template.validate_messages(records)
    system = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant" or (message["role"] == "system" and index):
            raise ValueError(f"{file}: record {index + 1} has role {message['role']!r}; a script holds user turns "
                             "and at most one system record, first")  # fmt: skip
        if message["role"] == "system":
            system = message["content"]
    users = [message["content"] for message in messages if message["role"] == "user"]
    if not users:
        raise ValueError(f"chat script {file} has no user turn")
    return system, users


def turn_settings(config, turn: int) -> sampling.SamplingSettings:
    """Sampling settings of a chat config for one turn; turn n draws with seed `config.seed + n`."""
    return sampling.sampling_settings(
        1, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
        repetition_penalty=config.repetition_penalty, seed=(config.seed + turn) % 2**32,
    )  # fmt: skip


# ---------------------------------------------------------------- the chat program (`experiments.chat`)

CONFIG_FIELDS = (
    "model", "num_sinks", "window", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
    "max_new_tokens", "system_prompt", "stop", "dtype", "mesh", "script", "chat_template", "chunk_size", "block_size",
)  # fmt: skip
NO_LIMIT = -1  # config.max_new_tokens of a reply that only an end id or a stop string ends
COMMANDS = {"/reset": "start a new conversation", "/stats": "cache, stream and speed", "/quit": "end the chat"}


def check_config(config) -> tuple[sampling.SamplingSettings, list[str]]:
    """Raise ValueError for a chat config that cannot run (before anything is loaded); returns the first
    turn's sampling settings and the stop strings."""
    missing = [field for field in CONFIG_FIELDS if field not in config]
    unknown = sorted(set(config.keys()) - set(CONFIG_FIELDS))
    if missing or unknown:
        raise ValueError(f"config fields missing: {missing}, unknown: {unknown} (see configs/chat.py)")
    from streamjax.cache import check_cache_shape

    check_cache_shape(config.num_sinks, config.window)
    if not isinstance(config.max_new_tokens, int) or (config.max_new_tokens < 0 and config.max_new_tokens != NO_LIMIT):
        raise ValueError(
            f"max_new_tokens must be an int >= 0, or {NO_LIMIT} for no limit; got {config.max_new_tokens!r}"
        )
    stop = [config.stop] if isinstance(config.stop, str) else list(config.stop)
    if any(not isinstance(string, str) or not string for string in stop):
        raise ValueError(f"stop must be a tuple of non-empty strings, got {config.stop!r}")
    for field in ("chunk_size", "block_size"):
        if not isinstance(config[field], int) or config[field] < 1:
            raise ValueError(f"{field} must be an int >= 1, got {config[field]!r}")
    loading.parse_dtype(config.dtype)
    if config.mesh:
        sharding.parse_mesh(config.mesh)
    return turn_settings(config, 0), stop


def run_chat(
    config, workdir: str | os.PathLike, lines=None, write: Callable[[str], None] | None = None
) -> tuple[Conversation, list[Turn]]:
    """The chat program: a scripted conversation (`config.script`) or an interactive one, reading user
    turns from `lines` (default stdin) and writing replies as they come with `write` (default stdout).
    Every turn is appended to `workdir/transcript.jsonl`; `workdir/summary.json` at the end. Returns the
    conversation as it ends and every turn's record."""
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    _, stop = check_config(config)
    system, script = read_script(config.script) if config.script else (config.system_prompt, None)
    workdir = pathlib.Path(workdir).expanduser()
    transcript = workdir / "transcript.jsonl"
    if transcript.exists():
        raise ValueError(f"{transcript} holds an earlier chat; use another --workdir or move it away")
    mesh = sharding.make_mesh(config.mesh) if config.mesh else None
    model = load_chat_model(config.model, config.dtype, mesh, config.chat_template or None)
    limit = None if config.max_new_tokens == NO_LIMIT else config.max_new_tokens
    stops = stopping.stop_conditions(
        1, end_ids=model.end_ids, max_new_tokens=limit, stop=stop, tokenizer=model.tokenizer,
        vocab_size=model.config.vocab_size,
    )  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    conversation = new_conversation(model, config.num_sinks, config.window, system)
    turns: list[Turn] = []
    messages = iter(script) if script is not None else _typed_lines(lines, write)
    for message in messages:
        if message in COMMANDS:
            if message == "/quit":
                break
            if message == "/reset":
                conversation = new_conversation(model, config.num_sinks, config.window, system)
            write(_stats(conversation, turns) if message == "/stats" else "(a new conversation)\n")
            continue
        write("model> " if script is None else f"user> {message}\nmodel> ")
        settings = turn_settings(config, len(turns))
        conversation, turn = chat_turn(
            model, conversation, message, settings, stops, on_text=write,
            chunk_size=config.chunk_size, block_size=config.block_size,
        )  # fmt: skip
        write("\n")
        turns.append(turn)
        with transcript.open("a", encoding="utf-8") as file:
            file.write(json.dumps(turn.record()) + "\n")
    _write_summary(workdir, config, turns)
    return conversation, turns


def _typed_lines(lines, write):
    """User turns typed at the terminal (or read from `lines`), until end of input."""
    if lines is None:
        write(f"Chat with the model; {', '.join(f'{c} ({what})' for c, what in COMMANDS.items())}.\n")
    source = iter(lines) if lines is not None else None
    while True:
        try:
            line = next(source) if source is not None else input("you> ")
        except (StopIteration, EOFError):
            return
        if line.strip():
            yield line.rstrip("\n")


def _stats(conversation: Conversation, turns: list[Turn]) -> str:
    cache = conversation.cache
    last = turns[-1] if turns else None
    speed = ""
    if last:
        rates = last.prefill_tokens_per_second, last.decode_tokens_per_second
        speed = ", last turn: prefill {:.1f}, decode {:.1f} tok/s".format(*rates)
    return (
        f"cache {int(cache.length[0])}/{cache.capacity} slots ({cache.num_sinks} sinks + {cache.window} window), "
        f"stream position {int(cache.next_position[0])}, {conversation.turns} turns{speed}, "
        f"process memory {resident_bytes() / 2**20:.0f} MiB\n"
    )


def resident_bytes() -> int:
    """The process's resident memory in bytes (Linux; 0 where /proc is missing)."""
    try:
        return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _write_summary(workdir: pathlib.Path, config, turns: list[Turn]) -> None:
    from streamjax import files, plotting

    steady = lambda tokens, seconds: tokens / seconds if seconds > 0 else None  # noqa: E731
    summary = {
        "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
        "turns": len(turns),
        "tokens_fed": sum(len(turn.input_token_ids) for turn in turns),
        "tokens_generated": sum(len(turn.reply_token_ids) for turn in turns),
        "compile_seconds": sum(turn.compile_seconds for turn in turns),
        "steady_prefill_tokens_per_second": steady(
            sum(len(t.input_token_ids) for t in turns[1:]), sum(t.prefill_seconds for t in turns[1:])
        ),
        "steady_decode_tokens_per_second": steady(
            sum(max(len(t.reply_token_ids) - 1, 0) for t in turns[1:]), sum(t.decode_seconds for t in turns[1:])
        ),
        "stream_position": turns[-1].stream_position if turns else 0,
        "made_by": plotting.provenance(),
    }
    files.write_json(workdir / "summary.json", summary)
