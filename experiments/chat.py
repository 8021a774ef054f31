"""Endless multi-turn chat in constant memory (the chat library is `streamjax.stream.chat`).

python -m experiments.chat --config=configs/chat.py --workdir=/tmp/streamjax/chat

A scripted conversation (`config.script`: a .txt of user turns or a .jsonl of records) or an interactive
one; every turn is appended to `workdir/transcript.jsonl`, `workdir/summary.json` at the end. Conversations
are saved to and loaded from `workdir/sessions/NAME.session.safetensors` (`streamjax.files.sessions`): by the
commands /save NAME and /load NAME, and with `config.session`, which resumes the named conversation if it is
saved and saves it after every turn.

Devices: `config.mesh` lays the model and the conversation's cache over a ("data", "model") mesh
(`streamjax.model.sharding`). With `config.distributed` the mesh spans several processes
(`streamjax.runs.distributed`): process 0 reads the user's turns (typed, or the script's) and sends each to
the others, every process computes every turn, and only process 0 prints and writes the workdir's files.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping

from experiments.program import main
from streamjax.files import chat_models, loading, sessions
from streamjax.model import sharding
from streamjax.model.cache import check_cache_shape
from streamjax.runs import distributed, machine, provenance, writes
from streamjax.stream import chat, sampling, stopping, templates

CONFIG_FIELDS = (
    "model", "num_sinks", "window", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
    "max_new_tokens", "system_prompt", "stop", "dtype", "mesh", "script", "chat_template", "chunk_size", "block_size",
    "session", "distributed",
)  # fmt: skip
NO_LIMIT = -1  # config.max_new_tokens of a reply that only an end id or a stop string ends
SESSIONS = "sessions"  # the workdir's folder of saved conversations
TRANSCRIPT_RECORDS = "transcript_records"  # a `session`'s extra: the transcript's length when it was saved
COMMANDS = {
    "/reset": "start a new conversation",
    "/stats": "cache, stream and speed",
    "/save NAME": f"save the conversation to workdir/{SESSIONS}/NAME{sessions.SESSION_SUFFIX}",
    "/load NAME": "go on with a saved conversation",
    "/quit": "end the chat",
}
COMMAND_WORDS = frozenset(command.split()[0] for command in COMMANDS)  # "/save NAME" is typed "/save mine"


def check_config(config) -> list[str]:
    """Raise ValueError for a chat config that cannot run (before anything is loaded or computed, so
    before `jax.distributed` starts); returns the stop strings."""
    missing = [field for field in CONFIG_FIELDS if field not in config]
    unknown = sorted(set(config.keys()) - set(CONFIG_FIELDS))
    if missing or unknown:
        raise ValueError(f"config fields missing: {missing}, unknown: {unknown} (see configs/chat.py)")
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
    distributed.parse(config.distributed)
    if config.session:
        try:
            sessions.session_path(".", config.session)
        except ValueError as error:
            raise ValueError(f"config.session: {error}") from None
    sampling.check_sampling_settings(1, **chat.turn_sampling(config, 0))
    return stop


def run(
    config, workdir: str | os.PathLike, lines=None, write: Callable[[str], None] | None = None
) -> tuple[chat.Conversation, list[chat.Turn]]:
    """The chat program: a scripted conversation (`config.script`) or an interactive one, reading user
    turns from `lines` (default stdin) and writing replies as they come with `write` (default stdout).
    Every turn is appended to `workdir/transcript.jsonl`; `workdir/summary.json` at the end. With
    `config.session`, the conversation saved under that name is resumed (if there is one) and saved after
    every turn. Returns the conversation as it ends and every turn's record (of this run)."""
    stop = check_config(config)
    distributed.initialize(config.distributed)
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    write = write if distributed.is_writer() else (lambda text: None)
    system, script = read_script(config.script) if config.script else (config.system_prompt, None)
    workdir = pathlib.Path(workdir).expanduser()
    transcript = workdir / "transcript.jsonl"
    session = sessions.session_path(workdir / SESSIONS, config.session) if config.session else None
    resuming = session is not None and session.exists()
    if transcript.exists() and not resuming:
        raise ValueError(
            f"{transcript} holds an earlier chat; use another --workdir, move it away, or resume a conversation "
            f"saved in {workdir / SESSIONS} (--config.session=NAME)"
        )
    mesh = sharding.config_mesh(config.mesh)
    model = chat_models.load_chat_model(config.model, config.dtype, mesh, config.chat_template or None)
    limit = None if config.max_new_tokens == NO_LIMIT else config.max_new_tokens
    stops = stopping.stop_conditions(
        1, end_ids=model.end_ids, max_new_tokens=limit, stop=stop, tokenizer=model.tokenizer,
        vocab_size=model.config.vocab_size,
    )  # fmt: skip
    if distributed.is_writer():
        workdir.mkdir(parents=True, exist_ok=True)
    conversation, records = _opening(model, config, system, session if resuming else None, transcript)
    turns: list[chat.Turn] = []
    messages = iter(script) if script is not None else _typed_lines(lines, write)
    for message in _from_process_zero(messages):
        command, _, name = message.partition(" ")
        if command in COMMAND_WORDS:
            if command == "/quit":
                break
            if command == "/reset":
                conversation = chat.new_conversation(model, config.num_sinks, config.window, system)
                said = "(a new conversation)\n"
            elif command == "/stats":
                said = _stats(conversation, turns)
            else:
                conversation, said = _session_command(command, name.strip(), model, conversation, config, workdir)
            write(said)
            continue
        write("model> " if script is None else f"user> {message}\nmodel> ")
        settings = chat.turn_settings(config, conversation.turns)
        conversation, turn = chat.chat_turn(
            model, conversation, message, settings, stops, on_text=write,
            chunk_size=config.chunk_size, block_size=config.block_size,
        )  # fmt: skip
        write("\n")
        turns.append(turn)
        if distributed.is_writer():
            with transcript.open("a", encoding="utf-8") as file:
                file.write(json.dumps(turn.record()) + "\n")
        records += 1
        if session is not None:
            sessions.save_conversation(session, model, conversation, {TRANSCRIPT_RECORDS: records})
    if distributed.is_writer():
        _write_summary(workdir, config, turns)
    return conversation, turns


def _from_process_zero(messages):
    """The user's turns as process 0 reads them from `messages`, in every process (the others never read
    theirs: only process 0 has the terminal)."""
    source = iter(messages) if distributed.is_writer() else iter(())
    while (message := distributed.broadcast_text(next(source, None))) is not None:
        yield message


def _opening(model, config, system: str, session: pathlib.Path | None, transcript: pathlib.Path):
    """(the conversation the chat starts with: the saved `session`, or a new one; the transcript's records)."""
    if session is None:
        return chat.new_conversation(model, config.num_sinks, config.window, system), 0
    conversation, extra = load_session(session, model, config)
    return conversation, _trim_transcript(transcript, extra.get(TRANSCRIPT_RECORDS))


def load_session(path: pathlib.Path, model: chat.ChatModel, config) -> tuple[chat.Conversation, dict]:
    """The conversation saved at `path` and its `extra`; ValueError when its cache is not the config's S + W."""
    conversation, extra = sessions.load_conversation(path, model)
    cache = conversation.cache
    if (cache.num_sinks, cache.window) != (config.num_sinks, config.window):
        raise ValueError(
            f"{path} holds a cache of {cache.num_sinks} sinks + {cache.window} window, not the config's "
            f"{config.num_sinks} + {config.window}: run with --config.num_sinks={cache.num_sinks} "
            f"--config.window={cache.window} to go on with it"
        )
    return conversation, extra


def _trim_transcript(transcript: pathlib.Path, records: int | None) -> int:
    """Drop the transcript's records past the `records` the resumed session was saved with (a turn whose
    record was appended before a kill stopped its save: the session does not hold it); returns the count."""
    lines = transcript.read_text(encoding="utf-8").splitlines(keepends=True) if transcript.exists() else []
    if records is not None and len(lines) > records:
        if distributed.is_writer():
            writes.write_text(transcript, "".join(lines[:records]))
        return records
    return len(lines)


def _session_command(command: str, name: str, model, conversation: chat.Conversation, config, workdir: pathlib.Path):
    """/save NAME or /load NAME: (the conversation after it, what to tell the user). A bad name, a missing
    or corrupt session, one of another model or a failed write is reported, and the chat goes on."""
    try:
        path = sessions.session_path(workdir / SESSIONS, name)
        if command == "/save":
            sessions.save_conversation(path, model, conversation)
            return conversation, f"(saved to {path})\n"
        loaded, _ = load_session(path, model, config)
    except (ValueError, OSError) as error:
        return conversation, f"(not {'saved' if command == '/save' else 'loaded'}: {error})\n"
    position = int(sharding.to_host(loaded.cache.next_position)[0])
    return loaded, f"(loaded {path}: {loaded.turns} turns, stream position {position})\n"


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


def _stats(conversation: chat.Conversation, turns: list[chat.Turn]) -> str:
    cache = conversation.cache
    last = turns[-1] if turns else None
    speed = ""
    if last:
        rates = last.prefill_tokens_per_second, last.decode_tokens_per_second
        speed = ", last turn: prefill {:.1f}, decode {:.1f} tok/s".format(*rates)
    length, position = (int(sharding.to_host(counter)[0]) for counter in (cache.length, cache.next_position))
    return (
        f"cache {length}/{cache.capacity} slots ({cache.num_sinks} sinks + {cache.window} window), "
        f"stream position {position}, {conversation.turns} turns{speed}, "
        f"process memory {machine.resident_bytes() / 2**20:.0f} MiB\n"
    )


def _write_summary(workdir: pathlib.Path, config, turns: list[chat.Turn]) -> None:

    steady = lambda tokens, seconds: tokens / seconds if seconds > 0 else None  # noqa: E731
    summary = {
        "config": provenance.plain_config(config),
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
        "made_by": provenance.made_by(),
    }
    writes.write_json(workdir / "summary.json", summary)


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
    messages = templates.validate_messages(records)
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


if __name__ == "__main__":
    main(run)
