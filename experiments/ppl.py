"""Streaming perplexity runs: one text, several methods, resumable, with a plot and a table.

`run(config, workdir)` evaluates every run of a config (`plan_runs`: each method of `config.method`
for each entry of `config.variants`) over the first `config.num_tokens` tokens of `config.data`,
and is what `python -m experiments.ppl` calls. The config fields are documented in `configs/ppl.py`.

Workdir layout:
    config.json          the config and the weights the workdir belongs to (checked on every restart,
                         the weights whenever a run is left to compute)
    lock                 flock'ed by the process using the workdir (`workdir_lock`); says which one
                         (lock.process<i>: process i of a distributed run)
    <run>/               one per run: the method name, or "<method>-<variant name>" with variants
        checkpoints/     orbax steps named by predictions done, while the run is in progress; each
                         step's metadata holds a SHA-256 of its arrays and the rest of its metadata
                         (position, timeline: `streamjax.runs.checkpoints`)
        corrupt_checkpoints/  steps that failed to restore or to match their digest, set aside
        nll.npy          float32 [num_tokens - 1]: NLL of text tokens 1, 2, ... given those before
        timeline.json    predictions, compute seconds and resident memory after every segment
        summary.json     the run's numbers and nll.npy's SHA-256; written last, so its presence means
                         the run is done
    log_ppl.png          log perplexity vs tokens, one line per run: cumulative and moving-window means
    segments.json/.png   log PPL, ms per token and resident memory every `segment_tokens` predictions
    results.md           the comparison table (also printed)
    summary.json         config, every run's summary, and `made_by`: the command and commit that wrote the
                         report (also under the plots); written last
Every file is written atomically and fsynced (`streamjax.runs.writes`).

Faults: SIGTERM or SIGINT saves the state at the end of the segment and raises `Interrupted`
(`StopRequests`); a full disk while saving a checkpoint or writing a result raises an ENOSPC OSError
naming the file and what is intact; a corrupt summary.json, timeline.json or config.json raises
`writes.CorruptFile` naming the file and the fix; a NaN or infinite NLL raises `NonFiniteError` naming
the prediction; a second process on the workdir gets `WorkdirInUse`. docs/ppl/README.md
("Reliability: what a long run survives") lists each with its test.

Resuming: every run advances in segments of `chunk_size` predictions on a grid anchored at the
first token, and checkpoints only at segment ends (`checkpoint_every` is a multiple of
`chunk_size`), so a restarted run feeds the model exactly the same chunks and batches as an
uninterrupted one and ends with a bitwise equal `nll.npy`. Checkpoints are saved synchronously
(the cache is donated to the next step) with orbax's default local-filesystem atomicity: each
step is written to a `*.orbax-checkpoint-tmp*` directory and renamed once complete, so a kill
during a save leaves the previous step intact and the temporary directory is removed on restart
(`checkpoints.remove_partial_steps`).

Weights: the fingerprint in `config.json` holds a SHA-256 of the model's weight files (the .gguf
file, or a checkpoint directory's config.json and *.safetensors), so a restart after other weights
were saved under the same model path is refused. A finished workdir is reported without reading
the model or hashing it.

Sink prefix: with `sink_prefix` set, its tokens (without the special tokens the tokenizer adds to
every call), repeated `sink_prefix_repeat` times, are fed right after the text's leading special
tokens: [BOS, prefix, text] with a tokenizer that adds a BOS, else [prefix, text]. So the prefix
fills the sinks after the BOS. NLL is kept only for the predictions of text tokens 1, 2, ...
(text token 0 being the BOS, if any), exactly the targets of a run without prefix; dropped are the
predictions of the prefix tokens (the first one is predicted from the BOS) and, without a BOS, that
of text token 0, which follows the prefix. With several leading special tokens the prefix follows
all of them, and the predictions of those after the first are kept.

Devices: `config.mesh` "" runs on the default device; a mesh such as "data=1,model=8" loads every
param straight onto its shards and shards each run's cache (`streamjax.model.sharding`), and checkpoints
restore onto the same shards. The mesh is part of the fingerprint: splitting a sum over devices
changes its float rounding, so a run resumes only on the mesh it started on, to stay bitwise equal.

Several processes: with `config.distributed` set (`streamjax.runs.distributed`), the same command runs on
every host, the mesh covers every process's devices, each process reads the text and the weight files and
puts its own devices' shards of the weights on them, every process saves and restores the checkpoints
together, and process 0 alone writes the files above. The process count is part of the fingerprint (a
restart with another count is refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from tqdm.auto import tqdm

from experiments.program import main
from streamjax.files import corpora, loading
from streamjax.model import sharding
from streamjax.model.config import ModelConfig
from streamjax.runs import checkpoints, distributed, finite, log, machine, plots, provenance, signals, writes
from streamjax.runs import workdir as workdir_lib
from streamjax.stream import perplexity

CONFIG_FIELDS = (
    "model", "data", "method", "num_sinks", "window", "num_tokens", "route", "chunk_size", "dtype",
    "checkpoint_every", "sink_prefix", "sink_prefix_repeat", "variants", "plot_window", "segment_tokens", "mesh",
    "skip_tokens", "sliding_sinks", "distributed",
)  # fmt: skip
# Fields that do not change any number a run computes; a restart may change them. Not `mesh`: a sharded
# matmul adds its partial sums in another order, which can change the last bit of the NLL. `distributed`
# differs between the processes of one run (their ids); its process count is fingerprinted instead.
UNFINGERPRINTED_FIELDS = ("checkpoint_every", "plot_window", "segment_tokens", "distributed")
VARIANT_FIELDS = (
    "name", "method", "num_sinks", "window", "num_tokens", "skip_tokens", "sink_prefix", "sink_prefix_repeat",
    "sliding_sinks",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Run:
    """One line of the comparison: a method, its cache budget, the sink prefix and how many text tokens it reads."""

    name: str
    spec: perplexity.EvalSpec
    sink_prefix: str = ""
    sink_prefix_repeat: int = 1
    num_tokens: int | None = None  # None: config.num_tokens
    skip_tokens: int = 0  # text tokens skipped after the leading special tokens (a stream started mid-text)


def plan_runs(config) -> list[Run]:
    """The runs of a config, validated (methods, cache shapes, variant fields) before any work."""
    variants = list(config.variants) or [{}]
    runs = []
    for variant in variants:
        unknown = sorted(set(variant) - set(VARIANT_FIELDS))
        if unknown:
            raise ValueError(f"variant {dict(variant)} has unknown field(s) {unknown}; allowed: {VARIANT_FIELDS}")
        fields = {key: variant.get(key, config.get(key)) for key in VARIANT_FIELDS[1:]}
        if fields["sink_prefix_repeat"] < 1:
            raise ValueError(f"sink_prefix_repeat must be >= 1, got {fields['sink_prefix_repeat']}")
        if fields["skip_tokens"] < 0:
            raise ValueError(f"skip_tokens must be >= 0, got {fields['skip_tokens']}")
        if not 2 <= fields["num_tokens"] <= config.num_tokens:
            raise ValueError(
                f"variant {dict(variant)}: num_tokens must be in [2, config.num_tokens={config.num_tokens}], "
                f"got {fields['num_tokens']}"
            )
        variant_name = variant.get("name") or f"{fields['num_sinks']}+{fields['window']}"
        for method in perplexity.parse_methods(fields["method"]):
            spec = perplexity.EvalSpec(
                method, fields["num_sinks"], fields["window"], config.route, config.chunk_size, fields["sliding_sinks"]
            )
            name = f"{method}-{variant_name}" if config.variants else method
            prefix = (fields["sink_prefix"], fields["sink_prefix_repeat"])
            runs.append(Run(name, spec, *prefix, num_tokens=fields["num_tokens"], skip_tokens=fields["skip_tokens"]))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs {names} are not uniquely named; give each variant a distinct `name`")
    return runs


def check_config(config) -> list[Run]:
    """Raise ValueError for a config that cannot run; returns its runs."""
    missing = [field for field in CONFIG_FIELDS if field not in config]
    unknown = sorted(set(config.keys()) - set(CONFIG_FIELDS))
    if missing or unknown:
        raise ValueError(f"config fields missing: {missing}, unknown: {unknown} (see configs/ppl.py)")
    for field in ("model", "data"):
        if not isinstance(config[field], str) or not config[field]:
            raise ValueError(f"config.{field} must be a non-empty string, got {config[field]!r}")
    if config.num_tokens < 2:
        raise ValueError(f"num_tokens must be >= 2 (one prediction needs two tokens), got {config.num_tokens}")
    if config.checkpoint_every < 0 or (config.chunk_size >= 1 and config.checkpoint_every % config.chunk_size):
        raise ValueError(
            f"checkpoint_every ({config.checkpoint_every}) must be 0 (never) or a positive multiple of chunk_size "
            f"({config.chunk_size}), so a resumed run computes exactly the chunks of an uninterrupted one"
        )
    for field in ("plot_window", "segment_tokens"):
        if config[field] < 1:
            raise ValueError(f"{field} must be >= 1 (a number of predictions), got {config[field]}")
    loading.parse_dtype(config.dtype)
    if config.mesh:
        sharding.parse_mesh(config.mesh)
    distributed.parse(config.distributed)
    return plan_runs(config)


def fingerprint(config, weights: str | None = None) -> dict[str, Any]:
    """The config fields that decide the numbers, as plain JSON values, and `weights`
    (`loading.weights_sha256`) under "weights" when given."""
    values = json.loads(json.dumps(provenance.plain_config(config)))
    fields = {key: values[key] for key in CONFIG_FIELDS if key not in UNFINGERPRINTED_FIELDS}
    for field in ("skip_tokens", "sliding_sinks"):  # absent from workdirs made before the field existed
        if not fields[field]:
            del fields[field]
    mesh = fields.pop("mesh")
    if mesh:  # one spelling per mesh ("model=8" is "data=1,model=8"); absent on one device, as before meshes
        fields["mesh"] = ",".join(f"{axis}={size}" for axis, size in sharding.parse_mesh(mesh).items())
    fields.update(distributed.fingerprint())
    if weights is not None:
        fields["weights"] = weights
    return fields


def check_workdir(workdir: pathlib.Path, config, weights: str | None = None) -> bool:
    """Raise if `workdir` is a file or holds a run of another config, or (with `weights`, the model's
    `loading.weights_sha256`) of other weights; True if it holds this config's run."""
    saved = workdir_lib.saved_fingerprint(workdir)
    if saved is None:
        return False
    workdir_lib.check_fingerprint(workdir, saved, fingerprint(config), ignore=("weights",))
    if weights is not None and saved.get("weights") != weights:
        raise ValueError(
            f"workdir {workdir} holds a run of other weights: the weight files of model {config.model!r} have "
            f"SHA-256 {weights} now, {saved.get('weights') or 'not recorded'} in the workdir; "
            "use another --workdir or delete this one"
        )
    return True


def run(config, workdir: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Evaluate every run of `config`, resuming what `workdir` holds; returns the summary dict.

    All checks (config, workdir, mesh, data, model, text length) come before anything is written, and
    the mesh is checked against the devices before anything is loaded.
    """
    runs = check_config(config)
    distributed.initialize(config.distributed)
    workdir = pathlib.Path(workdir).expanduser().resolve()
    started = check_workdir(workdir, config)
    if started and all((workdir / item.name / "summary.json").is_file() for item in runs):
        log.log("ppl", f"{workdir} holds a finished run of this config; reporting it")
        with workdir_lib.workdir_lock(workdir):
            return report(config, workdir, runs)
    mesh = sharding.config_mesh(config.mesh)
    corpora.corpus_files(config.data)
    source = loading.resolve_model(config.model)
    tokenizer = loading.load_tokenizer(source)
    if tokenizer is None:
        raise ValueError(f"model {config.model!r} has no tokenizer files, so the text cannot be tokenized")
    text = corpora.load_corpus_tokens(config.data, tokenizer, max(item.num_tokens + item.skip_tokens for item in runs))
    if text.shape[0] < 2:
        raise ValueError(f"the text of {config.data!r} has {text.shape[0]} token(s); at least two are needed")
    fed = {item.name: with_sink_prefix(item, tokenizer, run_text(item, tokenizer, text)) for item in runs}
    weights = loading.weights_sha256(source)
    if started:
        check_workdir(workdir, config, weights)
    model_config, params = loading.load_weights(source, loading.parse_dtype(config.dtype), mesh)
    for tokens, _ in fed.values():
        perplexity.check_text_tokens(tokens, model_config)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lib.workdir_lock(workdir), signals.StopRequests() as stop:
        if not check_workdir(workdir, config, weights) and distributed.is_writer():  # again: another run may
            writes.write_json(  # have started meanwhile
                workdir / "config.json",
                {"fingerprint": fingerprint(config, weights), "config": provenance.plain_config(config)},
            )
        distributed.barrier("ppl: config.json")
        for item in runs:
            run_one(item, *fed[item.name], workdir / item.name, config, model_config, params, progress, mesh, stop)
        return report(config, workdir, runs)


def run_text(item: Run, tokenizer, text: np.ndarray) -> np.ndarray:
    """The text tokens a run reads: the text's leading special tokens (its BOS), then `item.num_tokens`
    minus those from text token `item.skip_tokens` on (all of them from the start when 0)."""
    if not item.skip_tokens:
        return text[: item.num_tokens]
    start = len(corpora.special_tokens(tokenizer, "a")[0])
    return np.concatenate([text[:start], text[start + item.skip_tokens : item.skip_tokens + item.num_tokens]])


def with_sink_prefix(item: Run, tokenizer, text: np.ndarray) -> tuple[np.ndarray, slice]:
    """(tokens [P + T] int32 the run feeds, where its P prefix tokens lie in them) for text tokens [T].

    The prefix, the tokens of `item.sink_prefix` without the tokenizer's special tokens repeated
    `item.sink_prefix_repeat` times, goes right after the text's leading special tokens (its BOS).
    """
    if not item.sink_prefix:
        return text.astype(np.int32), slice(0, 0)
    ids = list(tokenizer(item.sink_prefix).input_ids)
    if len(ids) <= len(tokenizer("").input_ids):
        raise ValueError(f"sink_prefix {item.sink_prefix!r} of run {item.name} tokenizes to no tokens")
    leading, trailing = corpora.special_tokens(tokenizer, item.sink_prefix)
    prefix = np.asarray(corpora.strip_special_tokens(ids, leading, trailing) * item.sink_prefix_repeat, np.int32)
    start = len(leading)
    tokens = np.concatenate([text[:start], prefix, text[start:]]).astype(np.int32)
    return tokens, slice(start, start + len(prefix))


def text_predictions(nll: np.ndarray, prefix: slice) -> np.ndarray:
    """NLL [T - 1] of text tokens 1, 2, ... from the NLL [P + T - 1] of a run fed with its sink prefix at
    `prefix`: dropped are the predictions of the prefix tokens and, when the prefix comes first, of text
    token 0, since `nll[i]` predicts fed token i + 1."""
    first = max(prefix.start - 1, 0)
    return np.concatenate([nll[:first], nll[first + prefix.stop - prefix.start :]])


def run_one(
    item: Run,
    tokens: np.ndarray,
    prefix: slice,
    run_dir: pathlib.Path,
    config,
    model_config: ModelConfig,
    params: dict,
    progress: bool = True,
    mesh: Mesh | None = None,
    stop: signals.StopRequests | None = None,
) -> dict[str, Any]:
    """Evaluate one run over `tokens` [P + T] (the P sink prefix tokens at `prefix`, as `with_sink_prefix`
    gives them), resuming from `run_dir`; its summary.

    With a `mesh`, `params` must be on its shards (`loading.load_weights(..., mesh)`); the cache is put there too.
    A non-finite NLL stops the run (`NonFiniteError`) before anything of the segment is saved; a signal
    caught by `stop` saves the state at the end of the segment and raises `Interrupted`.
    """
    stop = stop or signals.StopRequests()
    if (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # left by a kill right after finishing
        return read_run_summary(run_dir)
    meta = {"fingerprint": fingerprint(config), "run": item.name, "tokens_sha256": provenance.tokens_sha256(tokens)}
    dtype = loading.parse_dtype(config.dtype)
    total = tokens.shape[0] - 1
    state, nll, seconds, timeline = _restore_or_init(
        run_dir / "checkpoints", meta, model_config, item.spec, tokens, dtype, mesh
    )
    manager = checkpoints.manager(run_dir / "checkpoints")
    timeline["starts"].append(state.position)
    bar = tqdm(total=total, initial=state.position, unit="tok", desc=item.name, disable=not progress)
    while state.position < total:
        start, clock = state.position, time.perf_counter()
        state, segment = perplexity.score_next(params, model_config, tokens, item.spec, state, item.spec.chunk_size)
        check_finite(segment, start, item.name, config.dtype)
        nll[start : state.position] = segment
        seconds += time.perf_counter() - clock
        _record(timeline, state.position, seconds)
        bar.set_postfix(ppl=f"{math.exp(float(np.mean(nll[: state.position], dtype=np.float64))):.3f}")
        bar.update(state.position - start)
        due = config.checkpoint_every and state.position % config.checkpoint_every == 0
        if (due or stop.requested()) and state.position < total:
            _save(manager, state, nll, dict(meta, position=state.position, seconds=seconds, timeline=timeline))
            stop.check(f"run {item.name} saved after {state.position} of {total} predictions in {run_dir}")
    bar.close()
    manager.close()
    text_nll = text_predictions(nll, prefix)
    summary = _run_summary(item, config, model_config, tokens, prefix, text_nll, seconds)
    nll_bytes = _npy_bytes(text_nll)
    summary["nll_sha256"] = hashlib.sha256(nll_bytes).hexdigest()
    saved = sorted(int(path.name) for path in (run_dir / "checkpoints").glob("*") if path.name.isdigit())
    distributed.barrier(f"ppl: {item.name} computed")  # every process has read the checkpoints it restored
    if distributed.is_writer():
        with writes.on_full_disk(
            f"run {item.name}'s checkpoint(s) ({', '.join(map(str, saved)) or 'none'}) are intact"
        ):
            writes.write_bytes(run_dir / "nll.npy", nll_bytes)
            writes.write_json(run_dir / "timeline.json", timeline)
            writes.write_json(run_dir / "summary.json", summary)  # last: its presence means the run is done
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    distributed.barrier(f"ppl: {item.name} written")
    return summary


def check_finite(segment: np.ndarray, start: int, run: str, dtype: str) -> None:
    """Raise `NonFiniteError` naming the first prediction of `segment` (predictions start, start + 1, ...)
    whose NLL is NaN or infinite, rather than let it into a perplexity."""
    bad = np.flatnonzero(~np.isfinite(segment))
    if bad.size:
        first = start + int(bad[0])
        raise finite.NonFiniteError(
            f"run {run}: the NLL of prediction {first} (of fed token {first + 1}) is {segment[bad[0]]}, and "
            f"{bad.size} of the {segment.size} predictions from {start} are not finite (dtype {dtype}; float16 "
            "overflows easily: try bfloat16 or float32). The run stopped without a result; its checkpoints are kept"
        )


def _record(timeline: dict, position: int, seconds: float) -> None:
    """Append where a run stands after a segment: predictions fed, compute seconds so far, resident memory."""
    timeline["position"].append(position)
    timeline["seconds"].append(round(seconds, 6))
    timeline["rss_bytes"].append(machine.resident_bytes())


def past_positions_from(spec: perplexity.EvalSpec, num_fed: int, model_positions: int) -> int | None:
    """The first fed token whose position is at or past the model's `model_positions`
    (max_position_embeddings) in a run of `spec` over `num_fed` tokens, or None if every position is within
    them. Dense attention puts token t at position t; the caches put it at min(t, S + W)."""
    num_sinks, window = spec.cache_shape(num_fed)
    largest = num_fed - 1 if spec.method == "dense" else min(num_fed - 1, num_sinks + window)
    return model_positions if largest >= model_positions else None


def _run_summary(item: Run, config, model_config, tokens, prefix: slice, text_nll, seconds) -> dict[str, Any]:
    num_sinks, window = item.spec.cache_shape(tokens.shape[0])
    mean_nll = float(np.mean(text_nll, dtype=np.float64))
    positions = model_config.max_position_embeddings
    return {
        "run": item.name, "method": item.spec.method, "num_sinks": item.spec.num_sinks, "window": item.spec.window,
        "cache": "all" if item.spec.method == "dense" else f"{num_sinks}+{window}",
        "sliding_sinks": item.spec.sliding_sinks, "layer_types": _layer_type_counts(model_config),
        "sink_prefix": item.sink_prefix, "sink_prefix_repeat": item.sink_prefix_repeat,
        "sink_prefix_tokens": tokens[prefix].tolist(), "sink_prefix_start": prefix.start,
        "num_tokens": int(tokens.shape[0] - (prefix.stop - prefix.start)), "num_predictions": int(text_nll.shape[0]),
        "mean_nll": mean_nll, "ppl": math.exp(mean_nll), "seconds": seconds,
        "tokens_per_second": (tokens.shape[0] - 1) / seconds if seconds > 0 else None,
        "model": config.model, "data": config.data, "route": item.spec.route, "chunk_size": item.spec.chunk_size,
        "dtype": config.dtype, "mesh": config.mesh, "model_family": model_config.family,
        "model_positions": positions,
        "past_positions_from": past_positions_from(item.spec, int(tokens.shape[0]), positions),
    }  # fmt: skip


def _layer_type_counts(model_config) -> dict[str, int]:
    """How many layers of each type the model has, with its sliding window (a hybrid model's sliding
    layers keep that window, plus `sliding_sinks` sinks, whatever the method)."""
    kinds = model_config.layer_type_of
    counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    return counts | ({"sliding_window": model_config.sliding_window} if "sliding_attention" in counts else {})


def _state_tree(state: perplexity.EvalState, nll: np.ndarray) -> dict:
    """What a checkpoint holds: the NLL so far and the cache's arrays (every array field of `SinkCache`)."""
    tree = {"nll": nll}
    if state.cache is not None:
        tree["cache"] = flax.serialization.to_state_dict(state.cache)
    return tree


def _save(manager: ocp.CheckpointManager, state, nll: np.ndarray, meta: dict) -> None:
    """Save a checkpoint of `state` as step `state.position` (`checkpoints.save`)."""
    tree = _state_tree(state, nll)
    checkpoints.save(manager, state.position, tree, meta, f"the checkpoint after {state.position} predictions")


def _restore_or_init(directory: pathlib.Path, meta: dict, model_config, spec, tokens: np.ndarray, dtype, mesh=None):
    """(state, nll buffer [N], seconds so far, timeline) from the latest sound checkpoint in `directory`
    (`checkpoints.restore_latest`), or the start of the text.

    The cache starts on its shards of `mesh`; a checkpoint is restored onto the same shards, since the
    abstract arrays given to orbax carry the shardings of the fresh cache.
    """
    state = perplexity.init_state(model_config, spec, tokens.shape[0], dtype)
    if mesh is not None and state.cache is not None:
        state.cache = sharding.shard_cache(state.cache, mesh)
    nll = np.full((tokens.shape[0] - 1,), np.nan, np.float32)
    timeline = {"position": [], "seconds": [], "rss_bytes": [], "starts": []}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state, nll))
    abstract["nll"] = nll
    restored = checkpoints.restore_latest(directory, abstract, lambda saved, path: _check_meta(saved, meta, path))
    if restored is None:
        return state, nll, 0.0, timeline
    log.log("ppl", f"resuming {meta['run']} from its checkpoint after {restored.step} of {nll.shape[0]} predictions")
    cache = state.cache
    if cache is not None:
        cache = flax.serialization.from_state_dict(cache, restored.tree["cache"])
    saved = restored.meta
    return (
        perplexity.EvalState(saved["position"], cache),
        np.asarray(restored.tree["nll"]),
        saved["seconds"],
        saved.get("timeline", timeline),
    )


def _check_meta(saved: dict, meta: dict, path: pathlib.Path) -> None:
    for key in ("fingerprint", "run", "tokens_sha256"):
        if saved.get(key) != meta[key]:
            raise ValueError(
                f"checkpoint {path} was saved with a different {key} "
                f"({saved.get(key)!r} != {meta[key]!r}); delete the workdir or use another"
            )


def report(config, workdir: pathlib.Path, runs: list[Run]) -> dict[str, Any]:
    """Write the plots, segments.json, results.md and, last, summary.json of finished runs, print the table;
    the summary dict. A full disk raises an ENOSPC OSError that leaves the runs' results intact."""
    summaries = [read_run_summary(workdir / item.name) for item in runs]
    nll = {item.name: _read_nll(workdir / item.name, summary) for item, summary in zip(runs, summaries)}
    segments = {
        item.name: segment_rows(nll[item.name], _read_timeline(workdir / item.name), config.segment_tokens)
        for item in runs
    }
    table, made_by = markdown_table(summaries), provenance.made_by()
    title = f"{config.model} on {config.data}"
    summary = {
        "workdir": str(workdir),
        "config": provenance.plain_config(config),
        "runs": summaries,
        "table": table,
        "made_by": made_by,
    }
    if not distributed.is_writer():
        return summary
    with writes.on_full_disk(f"the results of every run (<run>/summary.json, nll.npy) in {workdir} are intact"):
        plots.plot_log_ppl(workdir / "log_ppl.png", nll, window=config.plot_window, title=title, footer=made_by)
        segment_title = f"{title}, every {config.segment_tokens} predictions"
        plots.plot_segments(workdir / "segments.png", segments, title=segment_title, footer=made_by)
        writes.write_json(workdir / "segments.json", {"segment_tokens": config.segment_tokens, "runs": segments})
        writes.write_text(workdir / "results.md", table + "\n")
        writes.write_json(workdir / "summary.json", summary)
    print(table, flush=True)
    return summary


def markdown_table(summaries: list[Mapping[str, Any]]) -> str:
    """The comparison table of run summaries, in markdown, and under it a line for each run that went past
    the model's positions (its number there is out of the model's range)."""
    lines = [
        "| run | method | cache (sinks+window) | sink prefix | tokens | ppl | log ppl | seconds | tokens/s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        prefix = f"{s['sink_prefix']!r} x {s['sink_prefix_repeat']}" if s["sink_prefix"] else ""
        rate = f"{s['tokens_per_second']:.1f}" if s["tokens_per_second"] else "-"
        lines.append(
            f"| {s['run']} | {s['method']} | {s['cache']} | {prefix} | {s['num_tokens']} | {s['ppl']:.3f} "
            f"| {s['mean_nll']:.4f} | {s['seconds']:.1f} | {rate} |"
        )
    past = [s for s in summaries if s.get("past_positions_from") is not None]
    if past:
        lines.append("")
    for s in past:
        lines.append(
            f"- {s['run']}: past the model's {s['model_positions']} positions from fed token "
            f"{s['past_positions_from']} (of {s['num_tokens']}), so its number there is out of the model's range"
        )
    return "\n".join(lines)


def segment_rows(nll: np.ndarray, timeline: Mapping[str, list] | None, segment_tokens: int) -> list[dict[str, Any]]:
    """One row per `segment_tokens` predictions of `nll` [N]: `start`, `end`, `log_ppl` and `ppl` of the
    segment and, from a run's `timeline` (None for runs that have none), `ms_per_token` (compute time,
    interpolated between the segments the run advanced by) and `rss_mib` (resident memory at its end)."""
    positions = np.asarray([0] + list(timeline["position"]), np.float64) if timeline else None
    seconds = np.asarray([0.0] + list(timeline["seconds"]), np.float64) if timeline else None
    rows = []
    for start in range(0, len(nll), segment_tokens):
        end = min(start + segment_tokens, len(nll))
        log_ppl = float(np.mean(nll[start:end], dtype=np.float64))
        row = {"start": start, "end": end, "log_ppl": log_ppl, "ppl": math.exp(log_ppl)}
        if positions is not None and len(positions) > 1:
            cost = np.interp([start, end], positions, seconds)
            row["ms_per_token"] = 1000 * float(cost[1] - cost[0]) / (end - start)
            last = min(int(np.searchsorted(positions[1:], end)), len(positions) - 2)
            row["rss_mib"] = timeline["rss_bytes"][last] / 2**20
        rows.append(row)
    return rows


def _read_nll(run_dir: pathlib.Path, summary: Mapping[str, Any]) -> np.ndarray:
    """A finished run's nll.npy, checked against the SHA-256 its summary.json holds (when it holds one)."""
    content = (run_dir / "nll.npy").read_bytes()
    expected = summary.get("nll_sha256")
    if expected is not None and hashlib.sha256(content).hexdigest() != expected:
        raise ValueError(
            f"{run_dir / 'nll.npy'} does not match the SHA-256 in {run_dir / 'summary.json'}: the file is "
            f"corrupt; delete {run_dir} and run the same command to compute that run again"
        )
    return np.load(io.BytesIO(content))


def read_run_summary(run_dir: pathlib.Path) -> dict[str, Any]:
    """A finished run's summary.json; `writes.CorruptFile` naming it and the fix when it is corrupt."""
    remedy = f"delete {run_dir} and run the same command to compute that run again"
    return writes.read_json(run_dir / "summary.json", remedy, keys=["run", "mean_nll"])


def _read_timeline(run_dir: pathlib.Path) -> dict[str, list] | None:
    """A run's timeline.json (None if it has none); `writes.CorruptFile` naming it and the fix when it is corrupt."""
    path = run_dir / "timeline.json"
    if not path.is_file():
        return None
    remedy = f"delete it to report the run without its timings, or delete {run_dir} to compute the run again"
    return writes.read_json(path, remedy, keys=["position", "seconds", "rss_bytes"])


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, np.float32))
    return buffer.getvalue()


if __name__ == "__main__":
    main(run)
