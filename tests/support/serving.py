"""A server of tests: `python -m experiments.serve` started as a subprocess on 127.0.0.1 with a tiny chat
model, the clients that talk to it, and the chat library's replies it must equal."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx2 as httpx  # openai's HTTP client (httpx, renamed)
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamjax.stream import chat, sampling, stopping
from support.tiny_chat import REPO

API_KEY = "test-key-1234"
MAX_BODY_BYTES = 4096
MAX_TOKENS_LIMIT = 1_000_000  # a disconnected stream could run for minutes: only a cancel frees its slot
START_SECONDS = 300  # bounded waits: the server's start (loading, first compilations) on a shared 2-core CPU
REQUEST_SECONDS = 120
NUM_SINKS, WINDOW = 2, 30  # each stream's cache, on the server and in the library's replies it must equal


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
    """`python -m experiments.serve` on a free port of 127.0.0.1 (a tiny cache, short replies, an API key;
    `fields` override the config); returns once workdir/server.json says where. A workdir a server used
    before is reused: its sessions continue."""
    overrides = {"model": model_dir, "chat_template": template, "port": 0, "api_key": API_KEY,
                 "num_sinks": NUM_SINKS, "window": WINDOW, "slots": 2, "max_body_bytes": MAX_BODY_BYTES,
                 "default_max_tokens": 6, "max_tokens_limit": MAX_TOKENS_LIMIT, "chunk_size": 8, "block_size": 4,
                 **fields}  # fmt: skip
    command = [sys.executable, "-m", "experiments.serve", "--config=configs/serve.py", f"--workdir={workdir}"]
    command += [f"--config.{name}={value}" for name, value in overrides.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", STREAMJAX_COMPILATION_CACHE=str(workdir.parent / "xla"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "server.json").unlink(missing_ok=True)  # a killed server's: wait for this one's
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


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def library_chat(
    chat_model, user_turns: list[str], max_tokens: int, temperature: float = 0.0, first_seed: int = 0
) -> list[chat.Turn]:
    """The chat library's turns of one conversation alone in its cache (what the server must match); turn n
    draws with seed `first_seed + n` (the seed a test's client sends)."""
    conversation = chat.new_conversation(chat_model, NUM_SINKS, WINDOW)
    stops = stopping.stop_conditions(1, end_ids=sorted(chat_model.end_ids), max_new_tokens=max_tokens)
    turns = []
    for number, text in enumerate(user_turns):
        settings = sampling.sampling_settings(1, temperature=temperature, seed=first_seed + number)
        conversation, turn = chat.chat_turn(chat_model, conversation, text, settings, stops, chunk_size=8)
        turns.append(turn)
    return turns
