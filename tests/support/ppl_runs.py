"""A tiny perplexity experiment (a random Llama, a word-level text) and the drivers that run, kill and restart it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import ppl as ppl_config
from experiments import ppl
from support.models import random_hf_llama, save_word_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]


NUM_TOKENS = 97  # 96 predictions: six chunks of 16, one compilation per cache shape


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, text file, token ids of the text) for a tiny random Llama."""
    root = tmp_path_factory.mktemp("tiny")
    model = random_hf_llama(max_position_embeddings=1024)
    model.save_pretrained(root / "model")
    save_word_tokenizer(root / "model", model.config.vocab_size)
    ids = np.random.default_rng(0).integers(1, model.config.vocab_size, 400)
    (root / "text.txt").write_text(" ".join(f"w{i}" for i in ids))
    return root / "model", root / "text.txt", ids.astype(np.int32)


def tiny_config(tiny, **overrides):
    model_dir, text, _ = tiny
    config = ppl_config.get_config()
    config.model, config.data, config.num_tokens = str(model_dir), str(text), NUM_TOKENS
    config.num_sinks, config.window, config.chunk_size, config.checkpoint_every = 2, 30, 16, 32
    config.update(overrides)
    return config


def tiny_flags(tiny, **overrides) -> list[str]:
    config = tiny_config(tiny, **overrides)
    fields = ("model", "data", "method", "num_tokens", "num_sinks", "window", "chunk_size", "checkpoint_every")
    return ["--config=configs/ppl.py", *(f"--config.{field}={config[field]}" for field in fields)]


def run_entry_point(flags: list[str], workdir, env: dict | None = None) -> subprocess.Popen:
    env = env or dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "experiments.ppl", *flags, f"--workdir={workdir}"]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A workdir with every method run to the end, and the run's summary."""
    workdir = tmp_path_factory.mktemp("all_methods")
    config = tiny_config(tiny, method="dense,window,recompute,streaming")
    return config, workdir, ppl.run(config, workdir, progress=False)


def start_killed_run(moment: str, config, case: pathlib.Path) -> subprocess.Popen:
    """tests/killed_run.py on workdir `case`/workdir: it touches `case`/ready at `moment` and waits there."""
    fields = ("model", "data", "method", "num_tokens", "num_sinks", "window", "chunk_size", "checkpoint_every")
    overrides = json.dumps({field: config[field] for field in fields})
    command = [
        sys.executable,
        str(REPO / "tests" / "support" / "killed_run.py"),
        overrides,
        str(case / "workdir"),
        moment,
        str(case / "ready"),
    ]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    with open(case / "child.log", "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
