"""Faults a long perplexity run meets, each caused for real: signals (also while XLA computes), a full disk
(while saving a checkpoint or writing a result), corrupted checkpoints and result files, two processes on one
workdir, non-finite values. Each ends in bitwise the NLL of an uninterrupted run (the `finished` workdir of
tests/test_ppl.py, or one run beside it) or a clear error that leaves nothing misleading behind. A power loss is
not caused: the order of the system calls that make a write durable is checked instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from experiments import ppl
from streamjax.files import export, loading
from streamjax.runs import checkpoints, writes
from streamjax.runs.finite import NonFiniteError
from streamjax.stream import perplexity
from support import ppl_runs
from support.models import random_hf_llama, save_word_tokenizer
from support.ppl_runs import REPO, run_entry_point, start_killed_run, tiny_config, tiny_flags

tiny, finished = ppl_runs.tiny, ppl_runs.finished  # the shared fixtures, under their names


def _wait_for(path: pathlib.Path, process: subprocess.Popen, case: pathlib.Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"the child never reached its moment (exit {process.wait()}):\n{(case / 'child.log').read_text()}"
            )
        time.sleep(0.02)


def _uninterrupted(finished, method: str) -> np.ndarray:
    return np.load(finished[1] / method / "nll.npy")


# ---------------------------------------------------------------- preemption: SIGTERM and SIGINT


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_state_and_a_restart_ends_bitwise_equal(tiny, finished, tmp_path, capsys, signal_number):
    """A real signal to a real process in its third segment of 16 (checkpoints every 32): it saves after 48
    predictions, exits 128 + the signal's number with a message, and a restart resumes from 48."""
    process = start_killed_run("signal:streaming:3", tiny_config(tiny, method="streaming"), tmp_path)
    _wait_for(tmp_path / "ready", process, tmp_path)
    process.send_signal(signal_number)
    (tmp_path / "ready.sent").touch()
    assert process.wait(timeout=120) == 128 + signal_number
    log = (tmp_path / "child.log").read_text()
    name = signal.Signals(signal_number).name
    assert f"stopped by {name}: run streaming saved after 48 of 96 predictions" in log, log
    assert "run the same command to resume" in log
    run_dir = tmp_path / "workdir" / "streaming"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["32", "48"]
    assert not (run_dir / "summary.json").exists()

    capsys.readouterr()
    ppl.run(tiny_config(tiny, method="streaming"), tmp_path / "workdir", progress=False)
    assert "resuming streaming from its checkpoint after 48 of 96" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(run_dir / "nll.npy"), _uninterrupted(finished, "streaming"))


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """(model directory, text file, token ids) of a random Llama big enough (768 wide, 4 layers) that one chunk
    of 512 tokens takes about 1.5 s on this CPU (measured 1.5 to 1.7 s on 2 cores), and a text of 1537 words."""
    root = tmp_path_factory.mktemp("slow")
    settings = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 4, "num_attention_heads": 16}
    model = random_hf_llama(**settings, num_key_value_heads=4, max_position_embeddings=2048)
    model.save_pretrained(root / "model")
    save_word_tokenizer(root / "model", model.config.vocab_size)
    ids = np.random.default_rng(1).integers(1, model.config.vocab_size, 3 * 512 + 1)
    (root / "text.txt").write_text(" ".join(f"w{i}" for i in ids))
    return root / "model", root / "text.txt", ids.astype(np.int32)


SLOW_CHUNKS = {"method": "streaming", "num_tokens": 3 * 512 + 1, "num_sinks": 4, "window": 508}
SLOW_CHUNKS |= {"chunk_size": 512, "checkpoint_every": 0}  # no checkpoint but the one the signal asks for


def test_a_signal_while_xla_computes_a_chunk_saves_after_it_and_a_restart_ends_bitwise_equal(slow, tmp_path, capsys):
    """SIGTERM sent once the run has started computing its second chunk of three (no test hook waits: the main
    thread is inside XLA), checked to have been sent while that chunk computed: the run saves after it (1024
    predictions; it saves no other checkpoint), exits 143, and the restart ends with the NLL of an uninterrupted
    run, bit for bit."""
    config = tiny_config(slow, **SLOW_CHUNKS)
    process = start_killed_run("computing:streaming:2", config, tmp_path)
    _wait_for(tmp_path / "ready", process, tmp_path)
    seen = time.monotonic()
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    computed = json.loads((tmp_path / "ready.computed").read_text())
    assert computed["start"] < seen and sent < computed["end"], (computed, seen, sent)  # sent mid-chunk
    log = (tmp_path / "child.log").read_text()
    assert "stopped by SIGTERM: run streaming saved after 1024 of 1536 predictions" in log, log
    run_dir = tmp_path / "workdir" / "streaming"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["1024"]

    capsys.readouterr()
    ppl.run(config, tmp_path / "workdir", progress=False)
    assert "resuming streaming from its checkpoint after 1024 of 1536" in capsys.readouterr().err
    ppl.run(config, tmp_path / "uninterrupted", progress=False)
    uninterrupted = np.load(tmp_path / "uninterrupted" / "streaming" / "nll.npy")
    np.testing.assert_array_equal(np.load(run_dir / "nll.npy"), uninterrupted)


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_resumes(tiny, finished, tmp_path, capsys):
    process = start_killed_run("signal:streaming:3", tiny_config(tiny, method="streaming"), tmp_path)
    _wait_for(tmp_path / "ready", process, tmp_path)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # the child is still waiting in its third segment: the second one interrupts that wait
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) != 0
    log = (tmp_path / "child.log").read_text()
    assert "KeyboardInterrupt" in log and "stopped by" not in log
    run_dir = tmp_path / "workdir" / "streaming"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["32"]
    capsys.readouterr()
    ppl.run(tiny_config(tiny, method="streaming"), tmp_path / "workdir", progress=False)
    assert "resuming streaming from its checkpoint after 32 of 96" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(run_dir / "nll.npy"), _uninterrupted(finished, "streaming"))


def test_signal_handlers_are_restored_after_a_run(tiny, tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    ppl.run(tiny_config(tiny, method="streaming", num_tokens=33), tmp_path, progress=False)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ---------------------------------------------------------------- two processes on one workdir


def test_a_second_process_on_a_busy_workdir_is_refused_and_a_killed_one_leaves_no_lock(tiny, finished, tmp_path):
    config = tiny_config(tiny, method="streaming")
    first = start_killed_run("segment:streaming:3", config, tmp_path)
    _wait_for(tmp_path / "ready", first, tmp_path)
    second = run_entry_point(tiny_flags(tiny, method="streaming"), tmp_path / "workdir")
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 1
    assert f"error: [Errno 16] workdir {tmp_path / 'workdir'} is in use by another run (pid {first.pid} on" in stderr
    assert not (tmp_path / "workdir" / "streaming" / "summary.json").exists()

    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    third = run_entry_point(tiny_flags(tiny, method="streaming"), tmp_path / "workdir")
    _, stderr = third.communicate(timeout=120)
    assert third.returncode == 0, stderr
    np.testing.assert_array_equal(
        np.load(tmp_path / "workdir" / "streaming" / "nll.npy"), _uninterrupted(finished, "streaming")
    )


# ---------------------------------------------------------------- corrupted checkpoints


class _StopAfter:
    """`perplexity.score_next` that raises once a run has computed `segments` segments (a crash after a save)."""

    def __init__(self, segments: int):
        self.calls, self.segments, self.advance = 0, segments, perplexity.score_next

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.segments:
            raise RuntimeError("crash")
        return self.advance(*args, **kwargs)


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((path for path in directory.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)


def _flip_bytes(path: pathlib.Path) -> None:
    content = bytearray(path.read_bytes())
    for index in range(len(content) // 3, len(content) // 3 + 8):
        content[index] ^= 0xFF
    path.write_bytes(bytes(content))


def _edit_meta(step: pathlib.Path, change) -> None:
    """Rewrite a checkpoint's metadata (orbax's JSON of `checkpoints.save`'s meta) after `change(meta)`."""
    path = step / "meta" / "metadata"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


CORRUPTIONS = {
    "bytes flipped in the array data": lambda step: _flip_bytes(_largest_file(step / "state")),
    "array data truncated": lambda step: os.truncate(_largest_file(step / "state"), 10),
    "array data deleted": lambda step: shutil.rmtree(step / "state"),
    "metadata deleted": lambda step: shutil.rmtree(step / "meta"),
    "position altered in the metadata": lambda step: _edit_meta(step, lambda meta: meta.update(position=48)),
    "timeline altered in the metadata": lambda step: _edit_meta(step, lambda meta: meta["timeline"]["seconds"].pop()),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_one_before_resumed(
    tiny, finished, tmp_path, monkeypatch, capsys, corruption
):
    config = tiny_config(tiny, method="streaming")  # segments of 16, checkpoints at 32 and 64
    with monkeypatch.context() as patch:
        patch.setattr(perplexity, "score_next", _StopAfter(5))
        with pytest.raises(RuntimeError, match="crash"):
            ppl.run(config, tmp_path, progress=False)
    checkpoints = tmp_path / "streaming" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["32", "64"]
    CORRUPTIONS[corruption](checkpoints / "64")

    capsys.readouterr()
    ppl.run(config, tmp_path, progress=False)
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoints / '64'} is corrupt (" in err, err
    assert "resuming streaming from its checkpoint after 32 of 96" in err
    np.testing.assert_array_equal(np.load(tmp_path / "streaming" / "nll.npy"), _uninterrupted(finished, "streaming"))
    (kept,) = (tmp_path / "streaming" / "corrupt_checkpoints").iterdir()  # set aside, never deleted
    assert kept.name.startswith("64-")


def test_every_checkpoint_corrupt_starts_over(tiny, finished, tmp_path, monkeypatch, capsys):
    config = tiny_config(tiny, method="streaming")
    with monkeypatch.context() as patch:
        patch.setattr(perplexity, "score_next", _StopAfter(5))
        with pytest.raises(RuntimeError, match="crash"):
            ppl.run(config, tmp_path, progress=False)
    for step in ("32", "64"):
        _flip_bytes(_largest_file(tmp_path / "streaming" / "checkpoints" / step / "state"))
    capsys.readouterr()
    ppl.run(config, tmp_path, progress=False)
    err = capsys.readouterr().err
    assert err.count("is corrupt") == 2 and "resuming" not in err
    np.testing.assert_array_equal(np.load(tmp_path / "streaming" / "nll.npy"), _uninterrupted(finished, "streaming"))


def test_checkpoints_whose_digest_covers_only_their_arrays_are_set_aside(tiny, finished, tmp_path, monkeypatch, capsys):
    """Steps saved before the digest covered the metadata (position, timeline) hold a digest of their arrays
    alone: they are set aside as corrupt, saying why, and the run starts over."""
    config = tiny_config(tiny, method="streaming")
    arrays_only = checkpoints.state_digest
    with monkeypatch.context() as patch:
        patch.setattr(perplexity, "score_next", _StopAfter(5))
        patch.setattr(checkpoints, "state_digest", lambda tree, meta=None: arrays_only(tree))
        with pytest.raises(RuntimeError, match="crash"):
            ppl.run(config, tmp_path, progress=False)
    capsys.readouterr()
    ppl.run(config, tmp_path, progress=False)
    err = capsys.readouterr().err
    step = tmp_path / "streaming" / "checkpoints" / "64"
    assert f"checkpoint {step} is corrupt (it was saved before checkpoints covered their metadata: its digest" in err
    assert err.count("is corrupt") == 2 and "resuming" not in err
    np.testing.assert_array_equal(np.load(tmp_path / "streaming" / "nll.npy"), _uninterrupted(finished, "streaming"))


def test_a_corrupt_finished_nll_is_reported_not_plotted(tiny, tmp_path):
    config = tiny_config(tiny, method="streaming")
    ppl.run(config, tmp_path, progress=False)
    _flip_bytes(tmp_path / "streaming" / "nll.npy")
    with pytest.raises(ValueError, match=r"streaming/nll.npy does not match the SHA-256 in .*summary.json"):
        ppl.run(config, tmp_path, progress=False)


# ---------------------------------------------------------------- corrupt result files

# (file of a finished workdir, how it is spoiled, what the error says after "<path> is corrupt (")
CORRUPT_FILES = {
    "a run's summary.json, garbage": ("streaming/summary.json", lambda text: "\x00garbage", "not valid JSON: "),
    "a run's summary.json, truncated": ("streaming/summary.json", lambda text: text[: len(text) // 2], "not valid JSON"),
    "a run's summary.json, another JSON value": ("streaming/summary.json", lambda text: "[1, 2]", "it holds no 'run'"),
    "a run's timeline.json, truncated": ("streaming/timeline.json", lambda text: text[:40], "not valid JSON: "),
    "the workdir's config.json, garbage": ("config.json", lambda text: "{fingerprint", "not valid JSON: "),
    "the workdir's config.json, empty": ("config.json", lambda text: "", "not valid JSON: "),
    "the workdir's config.json, no fingerprint": ("config.json", lambda text: "{}", "it holds no 'fingerprint'"),
}  # fmt: skip
REMEDIES = {
    "streaming/summary.json": "delete {workdir}/streaming and run the same command to compute that run again",
    "streaming/timeline.json": "delete it to report the run without its timings, or delete {workdir}/streaming",
    "config.json": "if the workdir holds runs of the config you are running, delete the file and run the same command",
}


@pytest.mark.parametrize("case", list(CORRUPT_FILES))
def test_a_corrupt_result_file_is_an_error_naming_it_and_the_fix(tiny, finished, tmp_path, case):
    """Each file spoiled in a copy of a finished workdir: `writes.CorruptFile` (a ValueError: the entry point
    prints it and exits 1) naming the file and what to do, and following that advice finishes the report."""
    name, spoil, problem = CORRUPT_FILES[case]
    config, workdir = tiny_config(tiny, method="streaming"), tmp_path / "workdir"
    shutil.copytree(finished[1] / "streaming", workdir / "streaming")
    ppl.run(config, workdir, progress=False)  # config.json and the report of this config
    path = workdir / name
    path.write_text(spoil(path.read_text()))
    with pytest.raises(writes.CorruptFile) as raised:
        ppl.run(config, workdir, progress=False)
    message = str(raised.value)
    assert message.startswith(f"{path} is corrupt ({problem}"), message
    assert REMEDIES[name].format(workdir=workdir) in message, message
    if name == "streaming/summary.json":
        shutil.rmtree(workdir / "streaming")
    else:
        path.unlink()
    (summary,) = ppl.run(config, workdir, progress=False)["runs"]
    assert summary["mean_nll"] == {run["run"]: run for run in finished[2]["runs"]}["streaming"]["mean_nll"]


def test_the_entry_point_reports_a_corrupt_file_in_one_line_and_exits_1(tiny, finished, tmp_path):
    config, workdir = tiny_config(tiny, method="streaming"), tmp_path / "workdir"
    shutil.copytree(finished[1] / "streaming", workdir / "streaming")
    ppl.run(config, workdir, progress=False)
    (workdir / "streaming" / "timeline.json").write_text('{"position": [16, 3')
    process = run_entry_point(tiny_flags(tiny, method="streaming"), workdir)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in stderr and "JSONDecodeError" not in stderr, stderr
    assert f"error: {workdir / 'streaming' / 'timeline.json'} is corrupt (not valid JSON: " in stderr, stderr


def test_a_corrupt_report_summary_is_written_again(tiny, finished, tmp_path):
    """The workdir's own summary.json is only ever written (last, by the report), never read back."""
    config, workdir = tiny_config(tiny, method="streaming"), tmp_path / "workdir"
    shutil.copytree(finished[1] / "streaming", workdir / "streaming")
    ppl.run(config, workdir, progress=False)
    (workdir / "summary.json").write_text("{trunc")
    ppl.run(config, workdir, progress=False)
    assert json.loads((workdir / "summary.json").read_text())["runs"][0]["run"] == "streaming"


# ---------------------------------------------------------------- a full disk


def _record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, ...]]:
    """Patch os.fsync (recording the path of the descriptor) and os.replace/os.rename; the list they append to."""
    events, fsync, replace, rename = [], os.fsync, os.replace, os.rename

    def recorded_fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recorded(name: str, function):
        return lambda source, target: (events.append((name, str(source), str(target))), function(source, target))[1]

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded("rename", replace))
    monkeypatch.setattr(os, "rename", recorded("rename", rename))
    return events


def test_a_result_file_is_fsynced_renamed_into_place_then_its_directory_fsynced(tmp_path, monkeypatch):
    directory = tmp_path.resolve()
    (directory / "summary.json").write_text("old")
    events = _record_fsyncs_and_renames(monkeypatch)
    writes.write_json(directory / "summary.json", {"ppl": 18.5})
    partial, final = str(directory / "summary.json.partial"), str(directory / "summary.json")
    assert events == [("fsync", partial), ("rename", partial, final), ("fsync", str(directory))]
    assert json.loads((directory / "summary.json").read_text()) == {"ppl": 18.5}


def test_a_saved_model_is_fsynced_file_by_file_before_it_is_renamed_into_place(tiny, tmp_path, monkeypatch):
    """`export.save_model` (what the pre-training tokenizer does too): every file of the staging directory, the
    directory, then the rename, then the parent directory."""
    model_config, params = loading.load_weights(loading.resolve_model(str(tiny[0])), np.float32)
    root = tmp_path.resolve()
    events = _record_fsyncs_and_renames(monkeypatch)
    export.save_model(root / "model", params, model_config)
    staging = root / f"model.tmp-{os.getpid()}"
    assert events == [
        ("fsync", str(staging / "config.json")), ("fsync", str(staging / "model.safetensors")),
        ("fsync", str(staging)), ("rename", str(staging), str(root / "model")), ("fsync", str(root)),
    ]  # fmt: skip


FULL_DISK_DRIVER = r"""
import functools, json, pathlib, sys
import numpy as np
from configs import ppl as ppl_config
from experiments import ppl

config = ppl_config.get_config()
config.update(json.loads(sys.argv[1]))
workdir = pathlib.Path(sys.argv[2]).resolve()
filler = workdir.parent / "filler"
save, saves = ppl._save, []

def fill_then_save(manager, state, nll, meta):
    saves.append(state.position)
    if len(saves) == 2:  # the second checkpoint finds the filesystem full
        try:
            with open(filler, "wb", buffering=0) as file:
                while True:
                    file.write(b"\0" * 4096)
        except OSError:
            pass
    return save(manager, state, nll, meta)

ppl._save = fill_then_save
result = {}
try:
    ppl.run(config, workdir, progress=False)
except OSError as error:
    result["error"] = str(error)
result["left"] = sorted(path.name for path in (workdir / "streaming" / "checkpoints").iterdir())
ppl._save = save
filler.unlink()
ppl.run(config, workdir, progress=False)
result["nll"] = np.load(workdir / "streaming" / "nll.npy").tolist()
print("RESULT " + json.dumps(result))
"""


FULL_DISK_WRITES_DRIVER = r"""
import json, pathlib, sys
import numpy as np
from configs import ppl as ppl_config
from experiments import ppl
from streamjax.runs import writes

config = ppl_config.get_config()
config.update(json.loads(sys.argv[1]))
workdir = pathlib.Path(sys.argv[2]).resolve()
filler = workdir.parent / "filler"
write_bytes, result = writes.write_bytes, {}

def fill_the_disk():
    try:
        with open(filler, "wb", buffering=0) as file:
            while True:
                file.write(b"\0" * 4096)
    except OSError:
        pass

for target in sys.argv[3].split(","):
    def full_before_target(path, content):
        if path == workdir / target:
            fill_the_disk()
        write_bytes(path, content)

    writes.write_bytes = full_before_target
    try:
        ppl.run(config, workdir, progress=False)
        error = None
    except OSError as raised:
        error = str(raised)
    writes.write_bytes = write_bytes
    filler.unlink()
    listing = lambda directory: sorted(path.name for path in directory.iterdir())
    result[target] = {"error": error, "workdir": listing(workdir), "run": listing(workdir / "streaming")}
ppl.run(config, workdir, progress=False)
result["workdir"] = sorted(path.name for path in workdir.iterdir())
result["nll"] = np.load(workdir / "streaming" / "nll.npy").tolist()
print("RESULT " + json.dumps(result))
"""


def _on_a_small_tmpfs(tmp_path: pathlib.Path, driver: str, overrides: dict, *args: str) -> dict:
    """Run `driver` (a Python script) on a 16 MiB tmpfs mounted in a user and mount namespace (`unshare`, no root
    needed) as `driver OVERRIDES_JSON <tmpfs>/workdir ARGS...`; the JSON it prints after "RESULT "."""
    mount = tmp_path / "disk"
    mount.mkdir()
    (tmp_path / "driver.py").write_text(driver)
    script = f'mount -t tmpfs -o size=16m tmpfs "{mount}" && exec "$0" "$@"'
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    command += [sys.executable, str(tmp_path / "driver.py"), json.dumps(overrides), str(mount / "workdir"), *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def test_a_full_disk_while_writing_results_is_a_clear_error_and_a_restart_finishes(tiny, finished, tmp_path):
    """The disk fills up just before each result file in turn (the run's nll.npy, its summary.json, the plot, the
    table): each time the error names the file and what is intact, no partial file is left, and no result is
    there that should not be; the restart with space resumes and writes the whole report."""
    config = tiny_config(tiny, method="streaming")
    fields = ("model", "data", "method", "num_tokens", "num_sinks", "window", "chunk_size", "checkpoint_every")
    targets = ["streaming/nll.npy", "streaming/summary.json", "log_ppl.png", "results.md"]
    result = _on_a_small_tmpfs(tmp_path, FULL_DISK_WRITES_DRIVER, {f: config[f] for f in fields}, ",".join(targets))
    workdir = (tmp_path / "disk" / "workdir").resolve()
    run_intact = "run streaming's checkpoint(s) (32, 64) are intact"
    report_intact = f"the results of every run (<run>/summary.json, nll.npy) in {workdir} are intact"
    for target, intact in zip(targets, [run_intact, run_intact, report_intact, report_intact]):
        assert result[target]["error"] == (
            f"[Errno 28] no space left on the device while writing {workdir / target}; no partial file was left; "
            f"{intact}: free some space and run the same command to resume"
        ), result[target]["error"]
    assert result["streaming/nll.npy"]["run"] == ["checkpoints"]
    assert result["streaming/summary.json"]["run"] == ["checkpoints", "nll.npy", "timeline.json"]
    assert result["log_ppl.png"]["run"] == ["nll.npy", "summary.json", "timeline.json"]
    assert result["log_ppl.png"]["workdir"] == ["config.json", "lock", "streaming"]
    assert result["results.md"]["workdir"] == [
        "config.json",
        "lock",
        "log_ppl.png",
        "segments.json",
        "segments.png",
        "streaming",
    ]
    assert result["workdir"] == [
        "config.json", "lock", "log_ppl.png", "results.md", "segments.json", "segments.png", "streaming", "summary.json"
    ]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(result["nll"], np.float32), _uninterrupted(finished, "streaming"))


def test_a_full_disk_while_saving_is_a_clear_error_and_a_restart_with_space_resumes(tiny, finished, tmp_path):
    """A real full filesystem: a 16 MiB tmpfs mounted in a user and mount namespace (`unshare`, no root
    needed), filled up just before the run's second checkpoint."""
    config = tiny_config(tiny, method="streaming")
    fields = ("model", "data", "method", "num_tokens", "num_sinks", "window", "chunk_size", "checkpoint_every")
    result = _on_a_small_tmpfs(tmp_path, FULL_DISK_DRIVER, {field: config[field] for field in fields})
    assert result["error"].startswith("[Errno 28] no space left on the device while saving the checkpoint after 64")
    assert "the checkpoint(s) saved before (32) are intact: free some space and run the same command" in result["error"]
    assert result["left"] == ["32"]  # no partial checkpoint left behind
    np.testing.assert_array_equal(np.asarray(result["nll"], np.float32), _uninterrupted(finished, "streaming"))


# ---------------------------------------------------------------- non-finite values


@pytest.fixture(scope="module")
def overflowing(tiny, tmp_path_factory):
    """The tiny Llama with token `TOKEN`'s embedding at +-65000 (near float16's largest, 65504) and layer 0's
    MLP output scaled 30000 times: in float16 the residual stream overflows where that token is fed."""
    _, text, ids = tiny
    model = random_hf_llama(max_position_embeddings=1024)
    token = int(ids[28])
    with torch.no_grad():
        row = model.model.embed_tokens.weight[token]
        row.copy_(torch.sign(row) * 65000.0)
        model.model.layers[0].mlp.down_proj.weight *= 30000.0
    directory = tmp_path_factory.mktemp("overflowing") / "model"
    model.save_pretrained(directory)
    save_word_tokenizer(directory, model.config.vocab_size)
    return directory, int(np.flatnonzero(ids == token)[0])


def test_float16_overflow_stops_the_run_at_its_first_chunk_with_the_position(tiny, overflowing, tmp_path):
    model, first_fed = overflowing
    config = tiny_config(tiny, model=str(model), method="streaming", dtype="float16")
    segment_start = first_fed // 16 * 16  # the chunk that feeds the token
    with pytest.raises(NonFiniteError) as raised:
        ppl.run(config, tmp_path, progress=False)
    message = str(raised.value)
    assert f"predictions from {segment_start} are not finite (dtype float16" in message, message
    position = int(message.split("the NLL of prediction ")[1].split(" ")[0])
    assert segment_start <= position <= first_fed
    assert not (tmp_path / "streaming" / "summary.json").exists() and not (tmp_path / "summary.json").exists()
    finite = ppl.run(tiny_config(tiny, model=str(model), method="streaming"), tmp_path / "float32", progress=False)
    assert np.isfinite(finite["runs"][0]["ppl"])  # the same weights in float32 do not overflow
