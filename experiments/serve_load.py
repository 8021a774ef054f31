"""A bounded loopback load test of the server (`experiments.serve`): throughput, latency and memory.

    python -m experiments.serve_load --config=configs/serve_load.py --workdir=/tmp/streamjax/serve_load

The server runs as a child process (`python -m experiments.serve`, port 0, its workdir `workdir/server`),
killed whatever happens; the client is the standard library (`http.client`, server-sent events read
here). Every request is a greedy (temperature 0) streamed chat completion with `include_usage`, every
session its own `session_id`, every user turn `sentences_per_turn` consecutive sentences of the corpus
(no two turns alike). In order:

- warmup: one one-shot request (the programs compile), untimed;
- concurrency: for each n in `concurrency`, n sessions at once, `turns` turns each, `max_tokens` each:
  aggregate tokens/s (the completion tokens of every `usage` over the phase's wall time), time to first
  token (request sent to first text received) p50 / p95, latency per turn;
- long: `long_sessions` sessions at once for `long_turns` turns of `long_max_tokens`: per turn its time to
  first token, latency, decode tokens/s ((completion tokens - 1) over the time after the first token),
  the tokens fed to the stream so far (the sum of usage's prompt and completion tokens) and the
  server's resident memory (VmRSS of /proc/PID/status);
- memory: the server's RSS with the number of sessions resident after each phase; after a graceful stop
  (SIGTERM: the server saves its resident sessions) the size of each saved session file; a slot's cache
  bytes from the model's config;
- one-slot baseline (`one_slot_baseline`): a second server with one slot runs the 1-session phase;
- peer (`transformers_peer`): transformers' `generate` of the same model file, batch 1, greedy, on the
  first phase's first prompt as the chat template renders it, `max_tokens` new tokens.

The check: the 8-session aggregate over the 1-session aggregate against `generation.batch_speedup` of
the efficiency benchmark's JSON (batch 8 over batch 1 of the bare decode on this machine).

Outputs: `serve_load.json` {meta, prompts, warmup, concurrency, long, memory, one_slot_baseline, peer,
check, totals} and `results.md`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from experiments import efficiency
from experiments.program import main
from streamjax.files import chat_templates, corpora, loading
from streamjax.files.sessions import SESSION_SUFFIX
from streamjax.model.cache import init_cache
from streamjax.runs import log, machine, provenance, writes
from streamjax.stream import templates

CONFIG_FIELDS = (
    "model", "chat_template", "dtype", "num_sinks", "window", "slots", "block_size", "corpus", "sentences_per_turn",
    "concurrency", "turns", "max_tokens", "long_sessions", "long_turns", "long_max_tokens", "one_slot_baseline",
    "efficiency_json", "transformers_peer", "peer_rounds", "server_start_timeout_s", "request_timeout_s",
)  # fmt: skip
POSITIVE_INT_FIELDS = (
    "slots", "block_size", "sentences_per_turn", "turns", "max_tokens", "long_sessions", "long_max_tokens",
    "peer_rounds", "server_start_timeout_s", "request_timeout_s",
)  # fmt: skip
SERVE_CONFIG = "configs/serve.py"
WINDOW_TURNS = 10  # long sessions: medians over the first turns (from turn 2) and over the last ones


# ----------------------------------------------------------------------------------------------
# Config and prompts


def check_config(config) -> None:
    """ValueError naming a field that cannot run, before anything starts."""
    missing = [field for field in CONFIG_FIELDS if field not in config]
    unknown = sorted(set(config.keys()) - set(CONFIG_FIELDS))
    if missing or unknown:
        raise ValueError(f"config fields missing: {missing}, unknown: {unknown} (see configs/serve_load.py)")
    for field in POSITIVE_INT_FIELDS:
        if not is_int(config[field]) or config[field] < 1:
            raise ValueError(f"{field} must be an int >= 1, got {config[field]!r}")
    if not is_int(config.long_turns) or config.long_turns < 2:
        raise ValueError(
            f"long_turns must be an int >= 2 (turn 2 is compared with the last), got {config.long_turns!r}"
        )
    counts = tuple(config.concurrency)
    if not counts or not all(is_int(n) and 1 <= n <= config.slots for n in counts) or len(set(counts)) < len(counts):
        raise ValueError(f"concurrency must be distinct session counts in [1, slots={config.slots}], got {counts!r}")
    if config.long_sessions > config.slots:
        raise ValueError(f"long_sessions must be <= slots={config.slots}, got {config.long_sessions}")
    for field in ("one_slot_baseline", "transformers_peer"):
        if not isinstance(config[field], bool):
            raise ValueError(f"{field} must be True or False, got {config[field]!r}")
    if 1 not in counts or 8 not in counts:
        raise ValueError(f"concurrency must include 1 and 8 (the check compares them), got {counts!r}")
    loading.parse_dtype(config.dtype)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def user_turns(text: str, count: int, sentences_per_turn: int) -> list[str]:
    """`count` user messages, each `sentences_per_turn` consecutive sentences of `text` (whitespace joined),
    in the text's order."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.split()) >= 2]
    if len(sentences) < count * sentences_per_turn:
        raise ValueError(
            f"the corpus has {len(sentences)} sentences; {count} turns of {sentences_per_turn} need "
            f"{count * sentences_per_turn}: use a longer corpus or fewer turns"
        )
    return [" ".join(sentences[k * sentences_per_turn : (k + 1) * sentences_per_turn]) for k in range(count)]


def prompts_needed(config) -> int:
    return 1 + sum(config.concurrency) * config.turns + config.long_sessions * config.long_turns


# ----------------------------------------------------------------------------------------------
# The server and the client


class ServerProcess:
    """`python -m experiments.serve` as a child process on a free loopback port, in `workdir` (emptied
    first); `stop()` ends it with SIGTERM (it saves its sessions), `kill()` with SIGKILL."""

    def __init__(self, config, workdir: pathlib.Path, slots: int):
        self.workdir, self.config, self.slots = workdir, config, slots
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and wait until it listens (`self.port`)."""
        log.log("serve_load", f"starting a server with {self.slots} slots in {self.workdir}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        config = self.config
        overrides = {
            "port": 0,
            "slots": self.slots,
            "model": config.model,
            "dtype": config.dtype,
            "num_sinks": config.num_sinks,
            "window": config.window,
            "block_size": config.block_size,
        }
        if config.chat_template:
            overrides["chat_template"] = config.chat_template
        command = [sys.executable, "-m", "experiments.serve", f"--config={SERVE_CONFIG}", f"--workdir={self.workdir}"]
        command += [f"--config.{key}={value}" for key, value in overrides.items()]
        self.log_path = self.workdir.parent / f"{self.workdir.name}.log"
        python_path = os.pathsep.join(filter(None, [str(provenance.REPOSITORY), os.environ.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log_file:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command,
                cwd=provenance.REPOSITORY,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": python_path},
            )
        self.port = self.wait_listening(config.server_start_timeout_s)

    def wait_listening(self, timeout_s: float) -> int:
        """The port from `server.json` once the server writes it; RuntimeError if it exits or takes too long."""
        address, deadline = self.workdir / "server.json", time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.log_tail()}")
            if address.exists():
                return int(json.loads(address.read_text())["port"])
            time.sleep(0.2)
        raise RuntimeError(f"the server did not listen within {timeout_s} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def resident_bytes(self) -> int:
        """The server's VmRSS (bytes) from /proc/PID/status."""
        status = pathlib.Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024

    def metrics(self) -> dict[str, float]:
        """The server's /metrics as {name: value} (unlabelled series only)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.config.request_timeout_s)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        pairs = (line.split() for line in text.splitlines() if line and not line.startswith("#") and "{" not in line)
        return {name: float(value) for name, value in pairs}

    def stop(self) -> int:
        """SIGTERM, then wait for the exit (the server saves its resident sessions); its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=self.config.server_start_timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def running_server(config, workdir: pathlib.Path, slots: int) -> Iterator[ServerProcess]:
    server = ServerProcess(config, workdir, slots)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def chat_turn(port: int, model: str, session: str | None, messages: list[dict], max_tokens: int, timeout_s: float):
    """One greedy streamed chat completion: {text, usage, session, finish_reason, time_to_first_token_s,
    latency_s} (times from sending the request; the first token is the first non-empty text received)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"session_id": session} if session else {}),
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    start = time.perf_counter()
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:500]!r}")
        reply = read_events(response, start)
    finally:
        connection.close()
    return {**reply, "latency_s": time.perf_counter() - start}


def read_events(response: http.client.HTTPResponse, start: float) -> dict[str, Any]:
    """The reply of a stream of server-sent `chat.completion.chunk` events, up to `data: [DONE]`."""
    text, first, usage, session, finish_reason = [], None, None, None, None
    while line := response.readline():
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: ") :].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"the server failed mid-stream: {chunk['error']}")
        for choice in chunk["choices"]:
            if choice["delta"].get("content"):
                first = time.perf_counter() - start if first is None else first
                text.append(choice["delta"]["content"])
            finish_reason = choice["finish_reason"] or finish_reason
        usage, session = chunk.get("usage") or usage, chunk.get("session") or session
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return {
        "text": "".join(text),
        "usage": usage,
        "session": session,
        "finish_reason": finish_reason,
        "time_to_first_token_s": first,
    }


def run_sessions(server: ServerProcess, config, prompts: list[list[str]], max_tokens: int, names: list[str]):
    """Sessions `names` at once, session k speaking `prompts[k]` in turn; (per-session turn records, wall s).
    Each record: the turn's reply fields, its turn number and the server's RSS after it."""
    records: list[list[dict]] = [[] for _ in names]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(names))

    def converse(k: int) -> None:
        try:
            barrier.wait()
            messages: list[dict] = []
            for turn, prompt in enumerate(prompts[k], start=1):
                messages.append({"role": "user", "content": prompt})
                reply = chat_turn(server.port, config.model, names[k], messages, max_tokens, config.request_timeout_s)
                messages.append({"role": "assistant", "content": reply["text"]})
                records[k].append({"turn": turn, **reply, "server_rss_bytes": server.resident_bytes()})
        except BaseException as error:  # noqa: BLE001 -- re-raised in the calling thread
            errors.append(error)

    threads = [threading.Thread(target=converse, args=(k,)) for k in range(len(names))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a session failed: {errors[0]}") from errors[0]
    return records, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Phases


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q))


def phase_summary(records: list[list[dict]], wall_s: float, server: ServerProcess) -> dict[str, Any]:
    """Aggregate tokens/s, time to first token p50 / p95, latency per turn, and the turns themselves."""
    turns = [record for session in records for record in session]
    completion = sum(record["usage"]["completion_tokens"] for record in turns)
    first = [record["time_to_first_token_s"] for record in turns if record["time_to_first_token_s"] is not None]
    latency = [record["latency_s"] for record in turns]
    metrics = server.metrics()
    return {
        "sessions": len(records),
        "turns": len(turns),
        "wall_s": wall_s,
        "completion_tokens": completion,
        "prompt_tokens": sum(record["usage"]["prompt_tokens"] for record in turns),
        "aggregate_tokens_per_s": completion / wall_s,
        "time_to_first_token_s": {"p50": percentile(first, 50), "p95": percentile(first, 95), "count": len(first)},
        "latency_s": {"p50": percentile(latency, 50), "p95": percentile(latency, 95), "mean": statistics.mean(latency)},
        "finish_reasons": dict(sorted(collections_count(record["finish_reason"] for record in turns).items())),
        "session_status": dict(sorted(collections_count(record["session"] for record in turns).items())),
        "server_rss_bytes": server.resident_bytes(),
        "sessions_resident": int(metrics["streamjax_sessions_resident"]),
        "sessions_saved": int(metrics["streamjax_sessions_saved"]),
        "records": [[slim(record) for record in session] for session in records],
    }


def collections_count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts


def slim(record: dict) -> dict:
    """A turn record for the JSON: everything but the reply's text (its length instead)."""
    return {**{key: value for key, value in record.items() if key != "text"}, "reply_chars": len(record["text"])}


def warm_up(server: ServerProcess, config, prompt: str) -> dict[str, Any]:
    """One one-shot request, so that the programs compile before anything is timed."""
    messages = [{"role": "user", "content": prompt}]
    reply = chat_turn(server.port, config.model, None, messages, config.max_tokens, config.request_timeout_s)
    return {**slim(reply), "server_rss_bytes": server.resident_bytes()}


def concurrency_phases(server: ServerProcess, config, prompts: Iterator[str], prefix: str) -> dict[str, Any]:
    """For each session count n in `config.concurrency`: n sessions of `config.turns` turns at once."""
    phases = {}
    for count in config.concurrency:
        session_prompts = [[next(prompts) for _ in range(config.turns)] for _ in range(count)]
        names = [f"{prefix}-{count}-{k}" for k in range(count)]
        log.log("serve_load", f"{count} sessions at once, {config.turns} turns of {config.max_tokens} tokens")
        records, wall = run_sessions(server, config, session_prompts, config.max_tokens, names)
        phases[str(count)] = {**phase_summary(records, wall, server), "session_prompts": session_prompts}
    return phases


def long_sessions(server: ServerProcess, config, prompts: Iterator[str]) -> dict[str, Any]:
    """`long_sessions` sessions of `long_turns` turns at once; per turn decode speed, stream position, RSS."""
    session_prompts = [[next(prompts) for _ in range(config.long_turns)] for _ in range(config.long_sessions)]
    names = [f"long-{k}" for k in range(config.long_sessions)]
    log.log("serve_load", f"{config.long_sessions} long sessions of {config.long_turns} turns")
    records, wall = run_sessions(server, config, session_prompts, config.long_max_tokens, names)
    for session in records:
        position = 0
        for record in session:
            position += record["usage"]["prompt_tokens"] + record["usage"]["completion_tokens"]
            record["stream_tokens"] = position
            record["decode_tokens_per_s"] = decode_rate(record)
    summary = phase_summary(records, wall, server)
    summary["at_turn"] = {str(turn): turn_summary(records, turn) for turn in (2, config.long_turns)}
    last, size = config.long_turns, min(WINDOW_TURNS, config.long_turns - 1)
    early_turns, late_turns = (2, 1 + size), (last - size + 1, last)
    summary["windows"] = {f"{a}-{b}": window_summary(records, a, b) for a, b in (early_turns, late_turns)}
    early, late = (summary["windows"][f"{a}-{b}"] for a, b in (early_turns, late_turns))
    summary["late_over_early"] = {
        "decode_tokens_per_s_median": ratio(late["decode_tokens_per_s_median"], early["decode_tokens_per_s_median"]),
        "time_to_first_token_s_median": ratio(
            late["time_to_first_token_s_median"], early["time_to_first_token_s_median"]
        ),
        "server_rss_bytes_at_turn": summary["at_turn"][str(last)]["server_rss_bytes"]
        / summary["at_turn"]["2"]["server_rss_bytes"],
    }
    summary["cache_tokens"] = config.num_sinks + config.window
    return summary


def window_summary(records: list[list[dict]], first: int, last: int) -> dict[str, Any]:
    """Medians over turns `first`..`last` (inclusive) of every session: decode tokens/s, TTFT, latency."""
    rows = [record for session in records for record in session[first - 1 : last]]
    rates = [row["decode_tokens_per_s"] for row in rows if row["decode_tokens_per_s"] is not None]
    return {
        "decode_tokens_per_s_median": statistics.median(rates) if rates else None,
        "time_to_first_token_s_median": statistics.median(row["time_to_first_token_s"] or 0.0 for row in rows),
        "latency_s_median": statistics.median(row["latency_s"] for row in rows),
        "stream_tokens_at_end": [session[last - 1]["stream_tokens"] for session in records],
        "server_rss_bytes_at_end": max(session[last - 1]["server_rss_bytes"] for session in records),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def decode_rate(record: dict) -> float | None:
    """(completion tokens - 1) over the time from the first token to the end; None for a one-token reply."""
    tokens, first = record["usage"]["completion_tokens"], record["time_to_first_token_s"]
    if tokens < 2 or first is None or record["latency_s"] <= first:
        return None
    return (tokens - 1) / (record["latency_s"] - first)


def turn_summary(records: list[list[dict]], turn: int) -> dict[str, Any]:
    """Turn `turn` over the sessions: mean decode tokens/s, time to first token, stream tokens, max RSS."""
    rows = [session[turn - 1] for session in records]
    rates = [row["decode_tokens_per_s"] for row in rows if row["decode_tokens_per_s"] is not None]
    return {
        "decode_tokens_per_s": statistics.mean(rates) if rates else None,
        "time_to_first_token_s": statistics.mean(row["time_to_first_token_s"] or 0.0 for row in rows),
        "latency_s": statistics.mean(row["latency_s"] for row in rows),
        "stream_tokens": [row["stream_tokens"] for row in rows],
        "server_rss_bytes": max(row["server_rss_bytes"] for row in rows),
    }


# ----------------------------------------------------------------------------------------------
# Memory, the peer and the check


def slot_cache_bytes(config) -> dict[str, Any]:
    """A slot's cache: keys and values by the model's config (layers x 2 x kv heads x head dim x (S+W) x
    dtype bytes) and every array of a one-stream cache (positions and tokens too)."""
    model_config, _ = loading.load_weights(loading.resolve_model(config.model), loading.parse_dtype(config.dtype))
    dtype = loading.parse_dtype(config.dtype)
    shapes = jax.eval_shape(lambda: init_cache(model_config, 1, config.num_sinks, config.window, dtype))
    keys_values = (
        model_config.num_layers
        * 2
        * model_config.num_kv_heads
        * model_config.head_dim
        * (config.num_sinks + config.window)
        * dtype.itemsize
    )
    layout = {
        "num_layers": model_config.num_layers,
        "num_kv_heads": model_config.num_kv_heads,
        "head_dim": model_config.head_dim,
        "tokens": config.num_sinks + config.window,
        "dtype": str(dtype),
    }
    return {
        "keys_values_bytes": keys_values,
        "all_arrays_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)),
        **layout,
    }


def session_files(directory: pathlib.Path) -> dict[str, int]:
    """{session name: file bytes} of the saved sessions in `directory`."""
    return {
        path.name[: -len(SESSION_SUFFIX)]: path.stat().st_size for path in sorted(directory.glob("*" + SESSION_SUFFIX))
    }


def memory_summary(warmup: dict, phases: dict, long: dict, files: dict[str, int], cache: dict) -> dict[str, Any]:
    """RSS against resident sessions after each phase, its growth per resident session, the saved files."""
    points = [{"after": "warmup", "sessions_resident": 0, "server_rss_bytes": warmup["server_rss_bytes"]}]
    points += [
        {
            "after": f"{n} sessions",
            "sessions_resident": p["sessions_resident"],
            "sessions_saved": p["sessions_saved"],
            "server_rss_bytes": p["server_rss_bytes"],
        }
        for n, p in phases.items()
    ]
    points.append(
        {
            "after": "long sessions",
            "sessions_resident": long["sessions_resident"],
            "sessions_saved": long["sessions_saved"],
            "server_rss_bytes": long["server_rss_bytes"],
        }
    )
    fewest = next(point for point in points if point["sessions_resident"] >= 1)
    most = max(points, key=lambda point: point["sessions_resident"])  # the first to reach the most
    added = most["sessions_resident"] - fewest["sessions_resident"]
    growth = (most["server_rss_bytes"] - fewest["server_rss_bytes"]) / added if added else None
    sizes = list(files.values())
    return {
        "slot_cache": cache,
        "rss_points": points,
        "rss_growth_per_resident_session_bytes": growth,
        "rss_growth_from": f"{fewest['after']} to {most['after']}",
        "session_files": files,
        "session_file_bytes": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)}
        if sizes
        else None,
    }


def peer(config, prompt: str) -> dict[str, Any]:
    """transformers' greedy `generate` of the model file at batch 1 on `prompt` (a user turn rendered by the
    model's chat template), `max_tokens` new tokens: time to first token and decode tokens/s."""
    import torch

    source = loading.resolve_model(config.model)
    template = chat_templates.load_chat_template(source, config.chat_template or None)
    text = templates.render(template, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = loading.load_tokenizer(source)(text, add_special_tokens=False).input_ids
    model = efficiency.transformers_model(source, getattr(torch, config.dtype))
    prompt_ids, load_before = torch.as_tensor([ids]), machine.load_average()
    log.log("serve_load", f"transformers peer: {config.peer_rounds} + 1 generations of {config.max_tokens} tokens")
    first, rates = [], []
    for round_number in range(config.peer_rounds + 1):
        start = time.perf_counter()
        stamps, _ = efficiency.generate_stamped(model, prompt_ids, config.max_tokens)
        if round_number:  # the first call is untimed
            first.append(stamps[0] - start)
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {
        "library": "transformers",
        "transformers_version": __import__("transformers").__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "prompt_tokens": len(ids),
        "new_tokens": config.max_tokens,
        "rounds": config.peer_rounds,
        "time_to_first_token_s": statistics.median(first),
        "decode_tokens_per_s": statistics.median(rates),
        "time_to_first_token_all_s": first,
        "decode_tokens_per_s_all": rates,
        "not_run": "llama.cpp's server: no binary on this machine and no way to fetch one (no internet beyond PyPI)",
    }


def batch_check(config, phases: dict, baseline: dict | None) -> dict[str, Any]:
    """The 8-session aggregate over the 1-session aggregate against the efficiency benchmark's batch factor."""
    path = provenance.REPOSITORY / config.efficiency_json
    efficiency_results = writes.read_json(
        path, "run experiments.efficiency or set config.efficiency_json", ("generation",)
    )
    target = efficiency_results["generation"]["batch_speedup"]
    measured = phases["8"]["aggregate_tokens_per_s"] / phases["1"]["aggregate_tokens_per_s"]
    check = {
        "target": target,
        "target_from": f"{config.efficiency_json}: generation.batch_speedup",
        "measured": measured,
        "met": measured >= target,
    }
    if baseline is not None:
        over_one_slot = phases["8"]["aggregate_tokens_per_s"] / baseline["aggregate_tokens_per_s"]
        check["over_one_slot_server"] = {"measured": over_one_slot, "met": over_one_slot >= target}
    return check


# ----------------------------------------------------------------------------------------------
# The program


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Every phase of the module's docstring; writes serve_load.json and results.md to `workdir`."""
    check_config(config)
    workdir = pathlib.Path(workdir).expanduser()
    turns = user_turns(corpora.load_text(config.corpus), prompts_needed(config), config.sentences_per_turn)
    workdir.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), machine.load_average()
    prompts = iter(turns)
    warmup_prompt = next(prompts)
    with running_server(config, workdir / "server", config.slots) as server:
        warmup = warm_up(server, config, warmup_prompt)
        phases = concurrency_phases(server, config, prompts, "chat")
        long = long_sessions(server, config, prompts)
        server_totals = server.metrics()
        stop_code = server.stop()
    results = {"warmup": warmup, "concurrency": phases, "long": long}
    results["memory"] = memory_summary(
        warmup, phases, long, session_files(workdir / "server" / "sessions"), slot_cache_bytes(config)
    )
    results["memory"]["server_exit_code"] = stop_code
    single = phases["1"]["session_prompts"][0]  # the 1-session phase's turns
    results["one_slot_baseline"] = (
        one_slot_baseline(config, workdir, warmup_prompt, single) if config.one_slot_baseline else None
    )
    first_prompt = single[0]
    results["peer"] = peer(config, first_prompt) if config.transformers_peer else None
    results["check"] = batch_check(config, phases, results["one_slot_baseline"])
    results["totals"] = totals(warmup, phases, long, server_totals)
    results["prompts"] = {
        "corpus": config.corpus,
        "sentences_per_turn": config.sentences_per_turn,
        "count": len(turns),
        "first": first_prompt,
    }
    results["meta"] = describe(config, started, load_before)
    writes.write_json(workdir / "serve_load.json", results)
    writes.write_text(workdir / "results.md", results_table(results))
    return results


def one_slot_baseline(config, workdir: pathlib.Path, warmup_prompt: str, turns: list[str]) -> dict[str, Any]:
    """The 1-session phase (the same `turns`) on a server with one slot: its decode program is batch 1."""
    with running_server(config, workdir / "server_one_slot", 1) as server:
        warm_up(server, config, warmup_prompt)
        records, wall = run_sessions(server, config, [turns], config.max_tokens, ["one-slot-0"])
        summary = phase_summary(records, wall, server)
        server.stop()
    return summary


def totals(warmup: dict, phases: dict, long: dict, server_metrics: dict[str, float]) -> dict[str, int]:
    """Completion tokens: the sum of every usage the client read, and the server's own counter."""
    client = warmup["usage"]["completion_tokens"] + long["completion_tokens"]
    client += sum(phase["completion_tokens"] for phase in phases.values())
    return {
        "client_completion_tokens": client,
        "server_completion_tokens_total": int(server_metrics["streamjax_completion_tokens_total"]),
    }


def describe(config, started: float, load_before) -> dict[str, Any]:
    return {
        "made_by": provenance.made_by(),
        "config": provenance.plain_config(config),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": machine.load_average(),
        "wall_s": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------------------
# Report


def results_table(results: dict[str, Any]) -> str:
    """The measured numbers as Markdown tables."""
    meta, phases, long = results["meta"], results["concurrency"], results["long"]
    lines = [
        f"# Server load test: {meta['config']['model']} ({meta['config']['dtype']}, {meta['device']}, "
        f"{meta['cpu_count']} cores, load average before {fmt_load(meta['load_average_before'])})",
        "",
        "| sessions at once | turns | completion tokens | wall s | aggregate tokens/s | TTFT p50 s | TTFT p95 s "
        "| latency p50 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(f"{n} (slots {meta['config']['slots']})", phase) for n, phase in phases.items()]
    if results["one_slot_baseline"]:
        rows.append(("1 (slots 1)", results["one_slot_baseline"]))
    for label, phase in rows:
        lines.append(
            f"| {label} | {phase['turns']} | {phase['completion_tokens']} | {phase['wall_s']:.1f} | "
            f"{phase['aggregate_tokens_per_s']:.2f} | {phase['time_to_first_token_s']['p50']:.3f} | "
            f"{phase['time_to_first_token_s']['p95']:.3f} | {phase['latency_s']['p50']:.2f} |"
        )
    lines += ["", *long_table(long), "", *memory_table(results["memory"]), "", *check_table(results)]
    if results["peer"]:
        lines += ["", *peer_table(results)]
    return "\n".join(lines) + "\n"


def fmt_load(load) -> str:
    return "unknown" if load is None else " / ".join(f"{value:.2f}" for value in load)


def long_table(long: dict) -> list[str]:
    lines = [
        f"Long sessions: {long['sessions']} at once, cache {long['cache_tokens']} tokens.",
        "",
        "| turn | stream tokens per session | decode tokens/s | TTFT s | server RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for turn, row in long["at_turn"].items():
        lines.append(
            f"| {turn} | {', '.join(map(str, row['stream_tokens']))} | {number(row['decode_tokens_per_s'])} | "
            f"{row['time_to_first_token_s']:.3f} | {row['server_rss_bytes'] / 2**20:.1f} |"
        )
    for turns, row in long["windows"].items():
        lines.append(
            f"| {turns} (medians) | {', '.join(map(str, row['stream_tokens_at_end']))} at the end | "
            f"{number(row['decode_tokens_per_s_median'])} | {row['time_to_first_token_s_median']:.3f} | "
            f"{row['server_rss_bytes_at_end'] / 2**20:.1f} at the end |"
        )
    ratios = ", ".join(f"{key} {number(value, 3)}" for key, value in long["late_over_early"].items())
    return [*lines, "", f"Last over first (windows' medians; RSS at the last turn over turn 2): {ratios}."]


def number(value: float | None, decimals: int = 2) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def memory_table(memory: dict) -> list[str]:
    cache, files = memory["slot_cache"], memory["session_file_bytes"]
    growth = memory["rss_growth_per_resident_session_bytes"]
    lines = [
        "| per-session memory | bytes |",
        "|---|---|",
        f"| a slot's keys and values ({cache['num_layers']} layers x 2 x {cache['num_kv_heads']} kv heads x "
        f"{cache['head_dim']} x {cache['tokens']} tokens x {cache['dtype']}) | {cache['keys_values_bytes']:,} |",
        f"| a slot's whole cache (with positions and tokens) | {cache['all_arrays_bytes']:,} |",
        f"| server RSS growth per resident session ({memory['rss_growth_from']}) | "
        f"{'-' if growth is None else f'{growth:,.0f}'} |",
    ]
    if files:
        lines.append(
            f"| saved session file (min / median / max of {len(memory['session_files'])}) | "
            f"{files['min']:,} / {files['median']:,.0f} / {files['max']:,} |"
        )
    return lines


def check_table(results: dict) -> list[str]:
    check, phases = results["check"], results["concurrency"]
    lines = [
        "| check | measured | target | met |",
        "|---|---|---|---|",
        "| 8 sessions over 1 session, aggregate tokens/s (same server) | "
        f"{phases['8']['aggregate_tokens_per_s']:.2f} / "
        f"{phases['1']['aggregate_tokens_per_s']:.2f} = {check['measured']:.2f}x | >= {check['target']:.2f}x | "
        f"{'yes' if check['met'] else '**no**'} |",
    ]
    if "over_one_slot_server" in check:
        other = check["over_one_slot_server"]
        lines.append(
            f"| 8 sessions (slots 8) over 1 session (slots 1) | {phases['8']['aggregate_tokens_per_s']:.2f} / "
            f"{results['one_slot_baseline']['aggregate_tokens_per_s']:.2f} = {other['measured']:.2f}x | "
            f">= {check['target']:.2f}x | {'yes' if other['met'] else '**no**'} |"
        )
    return lines


def peer_table(results: dict) -> list[str]:
    peer_result, base = results["peer"], results["one_slot_baseline"] or results["concurrency"]["1"]
    first = base["records"][0][0]
    slots = "slots 1" if results["one_slot_baseline"] else f"slots {results['meta']['config']['slots']}"
    return [
        f"Peer on the same prompt ({peer_result['prompt_tokens']} tokens), batch 1, greedy:",
        "",
        "| | TTFT s | decode tokens/s |",
        "|---|---|---|",
        f"| transformers {peer_result['transformers_version']} generate (torch {peer_result['torch_version']}, "
        f"{peer_result['torch_threads']} threads) | {peer_result['time_to_first_token_s']:.3f} | "
        f"{peer_result['decode_tokens_per_s']:.2f} |",
        f"| streamjax server, first turn of the 1-session phase ({slots}) | "
        f"{first['time_to_first_token_s']:.3f} | {decode_rate(first) or 0:.2f} |",
    ]


if __name__ == "__main__":
    main(run)
