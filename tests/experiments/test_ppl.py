"""Streaming perplexity runs (`experiments.ppl`, `experiments/ppl.py`) on a tiny random Llama.

The tiny model is saved with `save_pretrained` next to a word-level tokenizer whose words "w1".."w96"
are token ids 1..96, so a text of such words is its own token ids.

Runs on a mesh need 8 devices, which XLA fixes when jax starts: they happen in child processes with
8 forced CPU devices, the entry point itself and this file run as a script (`measure_on_meshes`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppl as ppl_config
from experiments import ppl
from streamjax.files import corpora, loading
from streamjax.model import families, sharding
from streamjax.runs import checkpoints
from streamjax.stream import perplexity
from support import ppl_runs
from support.models import cpu_devices_env, random_hf_llama
from support.ppl_runs import NUM_TOKENS, REPO, run_entry_point, start_killed_run, tiny_config, tiny_flags

tiny, finished = ppl_runs.tiny, ppl_runs.finished  # the shared fixtures, under their names


def test_every_method_writes_sane_outputs(tiny, finished):
    _config, workdir, summary = finished
    assert [s["run"] for s in summary["runs"]] == ["dense", "window", "recompute", "streaming"]
    for run in summary["runs"]:
        nll = np.load(workdir / run["run"] / "nll.npy")
        assert nll.dtype == np.float32 and nll.shape == (NUM_TOKENS - 1,)
        assert np.all(np.isfinite(nll)) and np.all(nll > 0)
        assert run["ppl"] == pytest.approx(np.exp(np.mean(nll, dtype=np.float64)), rel=1e-9)
        assert run["num_sinks"] == 2 and run["window"] == 30 and run["num_tokens"] == NUM_TOKENS
        assert run["seconds"] > 0 and run["tokens_per_second"] > 0
        assert not (workdir / run["run"] / "checkpoints").exists()
    dense, window = np.load(workdir / "dense" / "nll.npy"), np.load(workdir / "window" / "nll.npy")
    assert np.abs(dense - window)[32:].max() > 1e-3  # the 32-token cache does evict
    caches = {run["run"]: run["cache"] for run in summary["runs"]}
    assert caches == {"dense": "all", "window": "0+32", "recompute": "2+30", "streaming": "2+30"}
    assert (workdir / "log_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "results.md").read_text().count("\n") == 2 + 4
    assert json.loads((workdir / "summary.json").read_text())["runs"] == summary["runs"]


def test_runs_equal_evaluate_in_one_go(tiny, finished):
    """Segments of chunk_size predictions feed the model the same chunks as one `evaluate` call."""
    _, workdir, _ = finished
    model_config, params, _ = loading.load_model(str(tiny[0]))
    tokens = tiny[2][:NUM_TOKENS]
    for method in perplexity.METHODS:
        expected = perplexity.evaluate(params, model_config, tokens, perplexity.EvalSpec(method, 2, 30, "chunk", 16))
        nll = np.load(workdir / method / "nll.npy")
        np.testing.assert_array_equal(nll, expected)  # recompute too: its windows are rows of one program


def test_streaming_equals_dense_while_nothing_is_evicted(tiny, tmp_path):
    config = tiny_config(tiny, method="dense,streaming", num_sinks=4, window=NUM_TOKENS)
    runs = ppl.run(config, tmp_path, progress=False)["runs"]
    dense, streaming = (np.load(tmp_path / run["run"] / "nll.npy") for run in runs)
    np.testing.assert_allclose(streaming, dense, rtol=0, atol=2.9e-6)  # measured 9.5e-7


def test_token_route_equals_chunk_route(tiny, finished, tmp_path):
    _, workdir, _ = finished
    ppl.run(tiny_config(tiny, route="token"), tmp_path, progress=False)
    chunk = np.load(workdir / "streaming" / "nll.npy")
    np.testing.assert_allclose(np.load(tmp_path / "streaming" / "nll.npy"), chunk, rtol=0, atol=1.5e-6)  # 4.8e-7


def test_sink_prefix_is_fed_first_and_not_scored(tiny, tmp_path):
    config = tiny_config(tiny, sink_prefix="w7", sink_prefix_repeat=3)
    summary = ppl.run(config, tmp_path, progress=False)["runs"][0]
    assert summary["sink_prefix_tokens"] == [7, 7, 7] and summary["num_predictions"] == NUM_TOKENS - 1
    model_config, params, _ = loading.load_model(str(tiny[0]))
    tokens = np.concatenate([[7, 7, 7], tiny[2][:NUM_TOKENS]])
    expected = perplexity.evaluate(params, model_config, tokens, perplexity.EvalSpec("streaming", 2, 30, "chunk", 16))
    np.testing.assert_array_equal(np.load(tmp_path / "streaming" / "nll.npy"), expected[3:])


def _save_bos_model(tiny, directory: pathlib.Path, template: str) -> None:
    """The tiny model with a word tokenizer whose post-processor adds <s> (id 96, in place of w96) and/or </s>
    (id 95, in place of w95) to every call: `template` is "<s> $A", "<s> $A </s>" or "$A </s>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).symlink_to(tiny[0] / name)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 95)}, "</s>": 95, "<s>": 96}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 96), ("</s>", 95)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize("template, start", [("<s> $A", 1), ("<s> $A </s>", 1), ("$A </s>", 0)])
def test_sink_prefix_goes_after_the_bos(tiny, tmp_path, template, start):
    """[BOS, prefix, text]: the NLL kept is that of text tokens 1, 2, ..., as without prefix."""
    _save_bos_model(tiny, tmp_path / "model", template)
    config = tiny_config(
        tiny, model=str(tmp_path / "model"), method="streaming", sink_prefix="w7 w8", sink_prefix_repeat=2
    )
    summary = ppl.run(config, tmp_path / "out", progress=False)["runs"][0]
    assert summary["sink_prefix_tokens"] == [7, 8, 7, 8] and summary["sink_prefix_start"] == start
    assert summary["num_tokens"] == NUM_TOKENS and summary["num_predictions"] == NUM_TOKENS - 1
    model_config, params, tokenizer = loading.load_model(str(tmp_path / "model"))
    text = tokenizer(tiny[1].read_text()).input_ids[:NUM_TOKENS]  # no </s>: the text is cut before its end
    assert text[0] == 96 if start else text[0] != 96
    fed = [*text[:start], 7, 8, 7, 8, *text[start:]]
    expected = perplexity.evaluate(
        params, model_config, np.asarray(fed), perplexity.EvalSpec("streaming", 2, 30, "chunk", 16)
    )
    # nll[i] predicts fed token i + 1: the four predictions dropped are those of the prefix after a BOS,
    # else those of prefix tokens 2-4 and text token 0.
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "streaming" / "nll.npy"), expected[4:])


def test_text_predictions_hand_example():
    nll = np.arange(10.0)  # predictions of fed tokens 1..10
    # [prefix x3, text 0..7]: the predictions of prefix tokens 2, 3 and of text token 0 are dropped.
    np.testing.assert_array_equal(ppl.text_predictions(nll, slice(0, 3)), [3, 4, 5, 6, 7, 8, 9])
    # [BOS, prefix x3, text 1..7]: those of the three prefix tokens.
    np.testing.assert_array_equal(ppl.text_predictions(nll, slice(1, 4)), [3, 4, 5, 6, 7, 8, 9])
    # [two leading specials, prefix x3, text 2..]: the second special token's prediction is kept.
    np.testing.assert_array_equal(ppl.text_predictions(nll, slice(2, 5)), [0, 4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(ppl.text_predictions(nll, slice(0, 0)), nll)


def test_variants_run_every_method_under_their_names(tiny, finished, tmp_path):
    variants = [{"num_sinks": 0, "window": 32}, {"name": "two", "num_sinks": 2, "window": 30}]
    summary = ppl.run(tiny_config(tiny, method="streaming", variants=variants), tmp_path, progress=False)
    assert [run["run"] for run in summary["runs"]] == ["streaming-0+32", "streaming-two"]
    assert [run["cache"] for run in summary["runs"]] == ["0+32", "2+30"]
    _, workdir, _ = finished  # 0 sinks + 32 is window attention over the last 32 tokens
    np.testing.assert_array_equal(
        np.load(tmp_path / "streaming-0+32" / "nll.npy"), np.load(workdir / "window" / "nll.npy")
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "streaming-two" / "nll.npy"), np.load(workdir / "streaming" / "nll.npy")
    )


def test_a_variant_has_its_own_method_and_length_and_every_run_its_segments(tiny, finished, tmp_path):
    """The long-stream layout (configs/ppl_long.py): streaming over the whole text, window over a prefix of it."""
    variants = [
        {"name": "long", "method": "streaming"},
        {"name": "short", "method": "window", "num_tokens": 41},
    ]
    config = tiny_config(tiny, method="dense", variants=variants, segment_tokens=40, plot_window=8)
    summary = ppl.run(config, tmp_path, progress=False)
    assert [(run["run"], run["num_tokens"]) for run in summary["runs"]] == [
        ("streaming-long", 97),
        ("window-short", 41),
    ]
    _, workdir, _ = finished
    np.testing.assert_array_equal(
        np.load(tmp_path / "streaming-long" / "nll.npy"), np.load(workdir / "streaming" / "nll.npy")
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "window-short" / "nll.npy"), np.load(workdir / "window" / "nll.npy")[:40]
    )
    segments = json.loads((tmp_path / "segments.json").read_text())["runs"]
    assert [(row["start"], row["end"]) for row in segments["streaming-long"]] == [(0, 40), (40, 80), (80, 96)]
    nll = np.load(workdir / "streaming" / "nll.npy")
    assert segments["streaming-long"][1]["log_ppl"] == pytest.approx(float(np.mean(nll[40:80], dtype=np.float64)))
    timeline = json.loads((tmp_path / "streaming-long" / "timeline.json").read_text())
    assert timeline["position"] == [16, 32, 48, 64, 80, 96] and timeline["starts"] == [0]
    assert all(row["ms_per_token"] > 0 and row["rss_mib"] > 50 for row in segments["streaming-long"])
    assert (tmp_path / "segments.png").stat().st_size > 10_000 and (tmp_path / "log_ppl.png").stat().st_size > 10_000


def test_skip_tokens_starts_a_fresh_stream_mid_text(tiny, tmp_path):
    """A run that skips 16 tokens equals a run on the text without its first 16 words (no BOS here)."""
    _, text, ids = tiny
    (tmp_path / "later.txt").write_text(" ".join(f"w{i}" for i in ids[16:]))
    skipped = ppl.run(
        tiny_config(tiny, method="streaming", num_tokens=60, skip_tokens=16), tmp_path / "skipped", progress=False
    )
    later = tiny_config(tiny, method="streaming", num_tokens=60, data=str(tmp_path / "later.txt"))
    ppl.run(later, tmp_path / "later", progress=False)
    assert skipped["runs"][0]["num_tokens"] == 60
    np.testing.assert_array_equal(
        np.load(tmp_path / "skipped" / "streaming" / "nll.npy"), np.load(tmp_path / "later" / "streaming" / "nll.npy")
    )


def test_segment_rows_hand_example():
    """Cost interpolated between the positions a run advanced by; memory read at the segment's end."""
    nll = np.array([1.0, 1.0, 3.0, 3.0, 2.0], np.float32)
    timeline = {"position": [2, 4, 5], "seconds": [1.0, 3.0, 3.5], "rss_bytes": [2**20, 3 * 2**20, 4 * 2**20]}
    rows = ppl.segment_rows(nll, timeline, segment_tokens=3)
    assert [(row["start"], row["end"]) for row in rows] == [(0, 3), (3, 5)]
    assert [row["log_ppl"] for row in rows] == pytest.approx([5 / 3, 2.5])
    assert [row["ms_per_token"] for row in rows] == pytest.approx([1000 * 2.0 / 3, 1000 * 1.5 / 2])  # s(3) = 2.0
    assert [row["rss_mib"] for row in rows] == [3.0, 4.0]
    assert "ms_per_token" not in ppl.segment_rows(nll, None, 3)[0]


def test_corpora_joined_with_plus_are_read_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2")
    (tmp_path / "b.txt").write_text("w3")
    assert corpora.corpus_files(f"{tmp_path}/b.txt+{tmp_path}/a.txt") == [tmp_path / "b.txt", tmp_path / "a.txt"]
    assert corpora.load_text(f"{tmp_path}/b.txt+{tmp_path}/a.txt") == "w3\n\nw1 w2"


def test_finished_workdir_is_reported_without_loading_the_model(finished, monkeypatch, capsys):
    config, workdir, summary = finished
    monkeypatch.setattr(loading, "load_weights", lambda *args: pytest.fail("a finished run loaded the model"))
    monkeypatch.setattr(loading, "weights_sha256", lambda *args: pytest.fail("a finished run hashed the weights"))
    assert ppl.run(config, workdir, progress=False)["runs"] == summary["runs"]
    assert "holds a finished run" in capsys.readouterr().err


def test_workdir_of_another_config_is_refused(tiny, finished):
    _, workdir, _ = finished
    changed = tiny_config(tiny, method="dense,window,recompute,streaming", window=31)
    with pytest.raises(ValueError, match=r"different config \(window: 30 in the workdir, 31 now\)"):
        ppl.run(changed, workdir, progress=False)


def _nll_files(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    return {path.parent.name: np.load(path) for path in sorted(workdir.glob("*/nll.npy"))}


def _first_checkpoint(checkpoints: pathlib.Path) -> bool:
    return checkpoints.is_dir() and any(path.name.isdigit() for path in checkpoints.iterdir())


def test_resume_after_sigkill_ends_with_the_uninterrupted_nll(tiny, finished, tmp_path):
    """Kill `python -m experiments.ppl` once the second run has checkpointed, restart, compare."""
    flags = tiny_flags(tiny, method="dense,streaming", checkpoint_every=16)
    process = run_entry_point(flags, tmp_path)
    deadline = time.monotonic() + 120
    while not _first_checkpoint(tmp_path / "streaming" / "checkpoints"):
        assert process.poll() is None, f"the run ended before it could be killed:\n{process.communicate()[1]}"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "streaming" / "summary.json").exists(), "killed too late to test resuming"

    restarted = run_entry_point(flags, tmp_path)
    _, stderr = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, stderr
    assert "resuming streaming from its checkpoint" in stderr
    _, uninterrupted, _ = finished  # same model, text, chunks and cache; only checkpoint_every differs
    for name, nll in _nll_files(tmp_path).items():
        np.testing.assert_array_equal(nll, np.load(uninterrupted / name / "nll.npy"))
    assert set(_nll_files(tmp_path)) == {"dense", "streaming"}
    made_by = json.loads((tmp_path / "summary.json").read_text())["made_by"]  # also written under the plot
    assert made_by.startswith("python -m experiments.ppl --config=configs/ppl.py") and " @ " in made_by


# (moment of tests/killed_run.py, method, what the restart resumes from). Checkpoints every 32 predictions,
# segments of 16: killed before segment 4, a run has done 48 predictions and saved after 32.
KILL_MOMENTS = {
    "during a dense run": ("segment:dense:4", "dense", "resuming dense from its checkpoint after 32 of 96"),
    "during a recompute run": ("segment:recompute:4", "recompute", "resuming recompute from its checkpoint after 32 of 96"),
    "between nll.npy and summary.json": ("summary:streaming", "streaming", "resuming streaming from its checkpoint after 64 of 96"),
    "during an orbax save": ("save:64", "streaming", "resuming streaming from its checkpoint after 32 of 96"),
}  # fmt: skip


@pytest.fixture(scope="module")
def killed(tiny, tmp_path_factory) -> dict[str, pathlib.Path | str]:
    """Per KILL_MOMENTS case, the workdir of a run whose process got SIGKILL at that moment, or why it did not.

    The child processes run side by side; each is killed as soon as it signals its moment.
    """
    root, children, outcome = tmp_path_factory.mktemp("killed"), {}, {}
    for index, (when, (moment, method, _)) in enumerate(KILL_MOMENTS.items()):
        (root / str(index)).mkdir()
        children[when] = (
            root / str(index),
            start_killed_run(moment, tiny_config(tiny, method=method), root / str(index)),
        )
    deadline = time.monotonic() + 300
    while len(outcome) < len(children):
        for when, (case, process) in children.items():
            if when in outcome:
                continue
            if (case / "ready").exists():
                process.send_signal(signal.SIGKILL)
                killed_by = process.wait(timeout=60) == -signal.SIGKILL
                outcome[when] = case / "workdir" if killed_by else f"exit {process.returncode} after the moment"
            elif process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                outcome[when] = (
                    f"not at its moment (exit {process.wait()}):\n{(case / 'child.log').read_text()[-3000:]}"
                )
        time.sleep(0.01)
    return outcome


@pytest.mark.parametrize("when", list(KILL_MOMENTS))
def test_killed_at_any_moment_ends_with_the_uninterrupted_nll(tiny, finished, killed, capsys, when):
    """A real process killed by SIGKILL at an exact moment, restarted on its workdir: bitwise the NLL of `finished`."""
    moment, method, resumed = KILL_MOMENTS[when]
    workdir = killed[when]
    assert isinstance(workdir, pathlib.Path), workdir
    run_dir = workdir / method
    assert not (run_dir / "summary.json").exists() and (run_dir / "checkpoints").is_dir()
    assert (run_dir / "nll.npy").exists() == (moment == "summary:streaming")
    left = [path.name for path in (run_dir / "checkpoints").iterdir()]
    assert any(".orbax-checkpoint-tmp" in name for name in left) == (moment == "save:64"), left
    capsys.readouterr()
    ppl.run(tiny_config(tiny, method=method), workdir, progress=False)
    assert resumed in capsys.readouterr().err
    _, uninterrupted, _ = finished
    np.testing.assert_array_equal(np.load(run_dir / "nll.npy"), np.load(uninterrupted / method / "nll.npy"))
    assert not (run_dir / "checkpoints").exists()


def test_swapped_weights_under_a_workdir_are_refused(tiny, tmp_path, monkeypatch):
    """Another model saved to the same path after a run was interrupted: the restart refuses the workdir."""
    model_dir, workdir = tmp_path / "model", tmp_path / "workdir"
    shutil.copytree(tiny[0], model_dir)
    config = tiny_config(tiny, model=str(model_dir), method="streaming")
    save = ppl._save

    class Interrupted(Exception):
        pass

    def save_and_stop(*args):  # interrupted right after its first checkpoint
        save(*args)
        raise Interrupted

    monkeypatch.setattr(ppl, "_save", save_and_stop)
    with pytest.raises(Interrupted):
        ppl.run(config, workdir, progress=False)
    monkeypatch.setattr(ppl, "_save", save)
    saved = json.loads((workdir / "config.json").read_text())["fingerprint"]["weights"]
    assert saved == loading.weights_sha256(loading.resolve_model(str(model_dir)))
    random_hf_llama(seed=1, max_position_embeddings=1024).save_pretrained(model_dir)
    message = rf"holds a run of other weights: the weight files of model '{re.escape(str(model_dir))}' have SHA-256 [0-9a-f]{{64}} now, {saved} in the workdir"
    with pytest.raises(ValueError, match=message):
        ppl.run(config, workdir, progress=False)
    assert not (workdir / "streaming" / "summary.json").exists()


def test_weights_hash_covers_the_config_and_every_safetensors_file(tiny, tmp_path):
    model_dir = shutil.copytree(tiny[0], tmp_path / "model")
    source = loading.resolve_model(str(model_dir))
    assert [path.name for path in loading.weight_files(source)] == ["config.json", "model.safetensors"]
    before = loading.weights_sha256(source)
    (model_dir / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text() + "\n")
    assert loading.weights_sha256(source) == before  # not a weight file (the tokens are checked on their own)
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + "\n")
    changed_config = loading.weights_sha256(source)
    assert changed_config != before
    (model_dir / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert loading.weights_sha256(source) not in (before, changed_config)
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert loading.weight_files(loading.resolve_model(str(gguf_file))) == [gguf_file]


def test_entry_point_reports_bad_input_and_exits_nonzero(tiny, tmp_path):
    process = run_entry_point(tiny_flags(tiny, method="streaming,sliding"), tmp_path / "out")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "unknown method 'sliding'" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case, overrides, message",
    [
        ("missing data", {"data": "/nonexistent/book.txt"}, "neither a named corpus"),
        ("empty text", {"data": "{tmp}/empty.txt"}, "empty"),
        ("one token", {"data": "{tmp}/one.txt"}, "has 1 token"),
        ("unknown method", {"method": "dense,sliding"}, "unknown method 'sliding'"),
        ("window < 1", {"window": 0}, "window must be >= 1"),
        ("workdir is a file", {}, "is a file"),
        ("checkpoint off grid", {"checkpoint_every": 40}, "multiple of chunk_size"),
        ("variant too long", {"variants": [{"num_tokens": 98}]}, r"num_tokens must be in \[2, config.num_tokens=97\]"),
        ("unknown variant field", {"variants": [{"sinks": 4}]}, r"unknown field\(s\) \['sinks'\]"),
        ("segment_tokens < 1", {"segment_tokens": 0}, "segment_tokens must be >= 1"),
        ("skip_tokens < 0", {"skip_tokens": -1}, "skip_tokens must be >= 0"),
        ("no model", {"model": "/nonexistent/model"}, "does not exist"),
    ],
)
def test_bad_input_raises_before_writing(tiny, tmp_path, case, overrides, message):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    (tmp_path / "one.txt").write_text("w5")
    overrides = {key: str(value).format(tmp=tmp_path) if key == "data" else value for key, value in overrides.items()}
    workdir = tmp_path / "out"
    if case == "workdir is a file":
        workdir.write_text("not a directory")
    with pytest.raises((ValueError, OSError), match=message):
        ppl.run(tiny_config(tiny, **overrides), workdir, progress=False)
    assert workdir.is_file() if case == "workdir is a file" else not workdir.exists()


def test_checkpoint_directory_without_tokenizer_is_refused(tiny, tmp_path):
    model_dir = tmp_path / "no_tokenizer"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).symlink_to(tiny[0] / name)
    config, _params, tokenizer = loading.load_model(str(model_dir))
    assert tokenizer is None and config.vocab_size == 97
    with pytest.raises(ValueError, match="has no tokenizer files"):
        ppl.run(tiny_config(tiny, model=str(model_dir)), tmp_path / "out", progress=False)


def test_uncached_hub_id_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        loading.resolve_model("nobody-here/no-such-model")


def test_tiny_model_loads_with_its_tokenizer(tiny):
    config, params, tokenizer = loading.load_model(str(tiny[0]), "bfloat16")
    assert tokenizer("w3 w96").input_ids == [3, 96]
    assert config.num_layers == 2 and {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}


@pytest.mark.real_assets
def test_smollm2_streaming_beats_window_attention_on_pride_and_prejudice(smollm2_gguf, austen_text, tmp_path):
    """1,200 tokens of Pride and Prejudice, SmolLM2-135M, 4 + 124 cache (measured: 20.06 vs 42.26)."""
    config = ppl_config.get_config()
    config.update(
        {"method": "streaming,window", "num_sinks": 4, "window": 124, "num_tokens": 1200, "checkpoint_every": 0}
    )
    runs = {run["method"]: run for run in ppl.run(config, tmp_path)["runs"]}
    streaming, window = runs["streaming"]["ppl"], runs["window"]["ppl"]
    assert streaming < 30 and window > 35 and streaming < 0.7 * window


# ---------------------------------------------------------------- on a mesh of 8 CPU devices

MESHES = ("data=1,model=8", "data=4,model=2")
# Shard shapes written out by hand from LOGICAL_RULES for the tiny Llama (2 layers, D 48, 6 heads of 8,
# 2 kv heads, MLP 80, vocab 97): a dimension is split only when its mesh axis divides it.
EXPECTED_PARAM_SHARDS = {
    "data=1,model=8": {"qkv": [48, 2, 5, 8], "o": [6, 8, 48], "gate_up": [48, 2, 10], "down": [10, 48], "embed": [97, 48]},
    "data=4,model=2": {"qkv": [48, 1, 5, 8], "o": [3, 8, 48], "gate_up": [48, 2, 40], "down": [40, 48], "embed": [97, 48]},
}  # fmt: skip
# Each layer's cache keys [B, K, H, C] of the streaming run (batch 1 is never split; kv heads only in two).
EXPECTED_CACHE_SHARDS = {"data=1,model=8": [1, 2, 8, 32], "data=4,model=2": [1, 1, 8, 32]}


def _shard_shape(array: jax.Array) -> list[int]:
    return list(array.addressable_shards[0].data.shape)


def _placed_as(tree, shardings) -> bool:
    leaves = jax.tree.leaves(tree)
    return all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, jax.tree.leaves(shardings)))


def _checkpoint_round_trip(model_config, params, tokens, mesh, directory: pathlib.Path) -> dict:
    """Advance a sharded streaming run 48 predictions, checkpoint it, restore it as a restart would."""
    spec = perplexity.EvalSpec("streaming", 2, 30, "chunk", 16)
    meta = {"fingerprint": {}, "run": "streaming", "tokens_sha256": ""}
    restore = lambda: ppl._restore_or_init(directory, meta, model_config, spec, tokens, jnp.float32, mesh)
    state, nll, _, _ = restore()
    state, nll[:48] = perplexity.score_next(params, model_config, tokens, spec, state, 48)
    ppl._save(checkpoints.manager(directory), state, nll, dict(meta, position=48, seconds=1.0))
    restored, restored_nll, _, _ = restore()
    same_nll = np.array_equal(restored_nll, nll, equal_nan=True)  # NaN: predictions not made yet
    return {
        "position": restored.position,
        "equal": bool(np.array_equal(restored.cache.keys, state.cache.keys) and same_nll),
        "placed": _placed_as(restored.cache, sharding.cache_shardings(restored.cache, mesh)),
        "keys": _shard_shape(restored.cache.keys[0]),
        "devices": len(restored.cache.keys[0].sharding.device_set),
    }


def measure_on_meshes(model_dir: pathlib.Path, text: pathlib.Path, root: pathlib.Path) -> dict:
    """What the mesh tests assert on (needs 8 devices): placement at load, checkpoints, a mesh that does not fit."""
    tokens = np.array([int(word[1:]) for word in text.read_text().split()[:NUM_TOKENS]], np.int32)
    out = {}
    for spec in MESHES:
        mesh = sharding.make_mesh(spec)
        model_config, params, _ = loading.load_model(str(model_dir), mesh=mesh)
        wanted = sharding.param_shardings(families.param_specs(model_config), mesh)
        shown = {
            **{name: params["layers"][0][name] for name in ("qkv", "o", "gate_up", "down")},
            "embed": params["embed"],
        }
        out[spec] = {
            "by_rules": _placed_as(params, wanted),
            "shards": {name: _shard_shape(param) for name, param in shown.items()},
            "restore": _checkpoint_round_trip(model_config, params, tokens, mesh, root / spec),
        }
    try:
        ppl.run(tiny_config((model_dir, text, tokens), mesh="model=3"), root / "bad_mesh", progress=False)
    except ValueError as error:
        out["bad_mesh"] = {"error": str(error), "wrote": (root / "bad_mesh").exists()}
    return out


@pytest.fixture(scope="module")
def on_meshes(tiny, tmp_path_factory) -> dict:
    """The 8-device measurements, from this file run as a script in a child process."""
    root = tmp_path_factory.mktemp("meshes")
    env = {**cpu_devices_env(8), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, __file__, str(tiny[0]), str(tiny[1]), str(root)]
    child = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    if child.returncode:
        pytest.fail(f"the 8-device run failed:\n{child.stdout[-3000:]}\n{child.stderr[-6000:]}")
    return json.loads((root / "measured.json").read_text())


@pytest.mark.parametrize("mesh", MESHES)
def test_params_are_loaded_onto_their_shards(on_meshes, mesh):
    assert on_meshes[mesh]["shards"] == EXPECTED_PARAM_SHARDS[mesh]
    assert on_meshes[mesh]["by_rules"]  # every param, by `sharding.param_shardings`


@pytest.mark.parametrize("mesh", MESHES)
def test_checkpoints_restore_onto_the_same_shards(on_meshes, mesh):
    restore = on_meshes[mesh]["restore"]
    assert restore["position"] == 48 and restore["equal"] and restore["placed"]
    assert restore["keys"] == EXPECTED_CACHE_SHARDS[mesh] and restore["devices"] == 8


def test_a_mesh_that_does_not_fit_the_devices_is_refused_before_writing(on_meshes):
    assert "config.mesh='model=3' does not fit" in on_meshes["bad_mesh"]["error"]
    assert "needs 3 devices but there are 8" in on_meshes["bad_mesh"]["error"]
    assert not on_meshes["bad_mesh"]["wrote"]


def test_entry_point_on_a_mesh_equals_the_single_device_run(tiny, finished, tmp_path):
    """`--config.mesh=data=1,model=8` on 8 CPU devices: every method's NLL as on one device."""
    methods = "dense,recompute,streaming"
    flags = [*tiny_flags(tiny, method=methods, checkpoint_every=16), "--config.mesh=data=1,model=8"]
    process = run_entry_point(flags, tmp_path, env=cpu_devices_env(8))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    _, single, _ = finished
    for method in methods.split(","):
        nll = np.load(tmp_path / method / "nll.npy")
        np.testing.assert_allclose(nll, np.load(single / method / "nll.npy"), rtol=0, atol=2.9e-6)  # 9.5e-7
        assert json.loads((tmp_path / method / "summary.json").read_text())["mesh"] == "data=1,model=8"
    assert json.loads((tmp_path / "config.json").read_text())["fingerprint"]["mesh"] == "data=1,model=8"


@pytest.mark.parametrize("mesh, message", [("model=3", "needs 3 devices"), ("tensor=8", "unknown mesh axis 'tensor'")])
def test_bad_mesh_is_refused_before_loading_anything(tiny, tmp_path, monkeypatch, mesh, message):
    for name in ("resolve_model", "load_tokenizer", "load_weights"):
        monkeypatch.setattr(loading, name, lambda *args, **kwargs: pytest.fail("loaded before checking the mesh"))
    with pytest.raises(ValueError, match=message):
        ppl.run(tiny_config(tiny, mesh=mesh), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_mesh_is_fingerprinted_in_one_spelling(tiny):
    single, short, long = (ppl.fingerprint(tiny_config(tiny, mesh=m)) for m in ("", "model=8", "data=1,model=8"))
    assert "mesh" not in single  # as in workdirs written before meshes, which stay resumable
    assert short == long and short["mesh"] == "data=1,model=8"


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[3])
    measured = measure_on_meshes(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), root)
    (root / "measured.json").write_text(json.dumps(measured, indent=1))


def test_a_run_past_the_models_positions_is_recorded(tiny, tmp_path):
    """Dense attention over 97 tokens of a model with 64 positions goes past them from fed token 64; the
    2+30 caches never do. summary.json and results.md say so."""
    model_dir, text, _ = tiny
    short = tmp_path / "model"
    shutil.copytree(model_dir, short)
    hf = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**hf, "max_position_embeddings": 64}))
    config = tiny_config(tiny, model=str(short), method="dense,streaming")
    summary = ppl.run(config, tmp_path / "workdir", progress=False)
    past = {run["run"]: (run["model_positions"], run["past_positions_from"]) for run in summary["runs"]}
    assert past == {"dense": (64, 64), "streaming": (64, None)}
    results = (tmp_path / "workdir" / "results.md").read_text()
    assert "- dense: past the model's 64 positions from fed token 64 (of 97)" in results
    assert "- streaming" not in results


@pytest.mark.parametrize(
    ("method", "num_sinks", "window", "num_fed", "expected"),
    [
        ("dense", 4, 1020, 8192, None),  # positions 0..8191: all within 8192
        ("dense", 4, 1020, 8193, 8192),
        ("streaming", 4, 8188, 9000, 8192),  # the query sits at min(t, S + W) = 8192 from token 8192
        ("streaming", 4, 8187, 9000, None),
        ("window", 4, 8188, 9000, 8192),
        ("recompute", 4, 1020, 100_000, None),
    ],
)
def test_past_positions_from_by_hand(method, num_sinks, window, num_fed, expected):
    spec = perplexity.EvalSpec(method, num_sinks, window)
    assert ppl.past_positions_from(spec, num_fed, 8192) == expected
