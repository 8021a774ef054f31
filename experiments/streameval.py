"""StreamEval (the paper's Figure 9 and Table 7): questions answered inside an endless stream.

Lines of text stream in, each holding a value (LongEval's line retrieval: `line 17: REGISTER_CONTENT is
<38193>`); every `query_every` lines the model is asked for the value of the line `answer_distance`
lines back, and answers inside the stream, greedily, through the same cache (no re-computation, no
dense fallback). The stream is a conversation through the model's chat template (`streamjax.stream.chat`):
an instruction and a worked example first (the first tokens: the sinks), then one user turn per block
of lines ending with the question, the model's answer the assistant's turn. An answer is correct when
the last number in it is the line's value (as LongEval scores: "The REGISTER_CONTENT in line 17 is
<38193>" gives 38193). StreamingLLM does not extend memory: once the line has left
the cache (more than W tokens back), the answer cannot be recalled, which the accuracy against answer
distance shows.

`run(config, workdir)` is what `python -m experiments.streameval` calls (fields: configs/streameval.py).

Devices: `config.mesh` lays the model and each stream's cache over a ("data", "model") mesh
(`streamjax.model.sharding`); with `config.distributed` the mesh spans several processes
(`streamjax.runs.distributed`), each computing every answer, and process 0 writes the workdir's files.
A workdir's report is kept only by a run with the same mesh and number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from experiments.program import main
from streamjax.files import chat_models, loading
from streamjax.model import sharding
from streamjax.runs import distributed, log, plots, provenance, writes
from streamjax.stream import chat, feed, perplexity, sampling, stopping

METHODS = ("dense", "window", "streaming")
INSTRUCTION = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and contains "
    "a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, memorize its "
    "corresponding <REGISTER_CONTENT>. When I ask for the REGISTER_CONTENT of a line, answer with its number only."
)


@dataclasses.dataclass(frozen=True)
class Query:
    """A question after line `asked_after` (0-based) about line `line`, whose value is `expected`."""

    line: int
    asked_after: int
    expected: int


@dataclasses.dataclass(frozen=True)
class Stream:
    """One StreamEval stream: its lines' values and its queries, and the worked example before it."""

    values: list[int]
    queries: list[Query]
    example: tuple[str, str]  # (user message, assistant answer) shown first


def line_text(index: int, value: int) -> str:
    return f"line {index}: REGISTER_CONTENT is <{value}>"


def question(index: int) -> str:
    return f"What is the REGISTER_CONTENT in line {index}?"


def make_stream(num_lines: int, query_every: int, answer_distance: int, seed: int) -> Stream:
    """A seeded stream: 5-digit values, a query after every `query_every`-th line once `answer_distance`
    lines exist before it, about the line `answer_distance` lines back (line i - answer_distance + 1
    after line i, so the answer is `answer_distance` lines from the end of the block, counting itself)."""
    check_stream_shape(num_lines, query_every, answer_distance)
    rng = np.random.default_rng(seed)
    values = rng.integers(10_000, 100_000, size=num_lines).tolist()
    queries = [
        Query(line=after - answer_distance + 1, asked_after=after, expected=values[after - answer_distance + 1])
        for after in range(query_every - 1, num_lines, query_every)
        if after - answer_distance + 1 >= 0
    ]
    example_values = rng.integers(10_000, 100_000, size=3).tolist()
    example_lines = "\n".join(line_text(1000 + i, value) for i, value in enumerate(example_values))
    example = (f"{INSTRUCTION}\n\n{example_lines}\n{question(1001)}", str(example_values[1]))
    return Stream(values, queries, example)


def check_stream_shape(num_lines: int, query_every: int, answer_distance: int) -> None:
    """ValueError for a stream shape that can ask no question."""
    if answer_distance < 1:
        raise ValueError(f"answer_distance must be >= 1 (1: the last line before the question), got {answer_distance}")
    if query_every < 1:
        raise ValueError(f"query_every must be >= 1, got {query_every}")
    if num_lines <= answer_distance:
        raise ValueError(
            f"num_lines ({num_lines}) must exceed answer_distance ({answer_distance}): no query could be asked"
        )


def turns(stream: Stream, query_every: int) -> list[tuple[str, range, Query | None]]:
    """The user turns after the worked example: (message, its lines, its question): each block of
    lines, ended by a question when one is due (a block ends at each question and at the last line)."""
    asked = {query.asked_after: query for query in stream.queries}
    blocks, start = [], 0
    for after in range(len(stream.values)):
        if after in asked or after == len(stream.values) - 1:
            lines = "\n".join(line_text(i, stream.values[i]) for i in range(start, after + 1))
            query = asked.get(after)
            blocks.append((lines + (f"\n{question(query.line)}" if query else ""), range(start, after + 1), query))
            start = after + 1
    return blocks


def answered_value(text: str) -> int | None:
    """The value an answer gives: its last number (None without one)."""
    numbers = re.findall(r"\d+", text)
    return int(numbers[-1]) if numbers else None


def run_stream(model: chat.ChatModel, stream: Stream, query_every: int, num_sinks: int, window: int,
               max_tokens: int | None, sample: int) -> list[dict[str, Any]]:  # fmt: skip
    """Feed one stream through a cache of num_sinks + window, answering every question greedily inside
    it; one record per query. With `max_tokens`, stop before the stream would pass that many tokens
    (dense attention: its cache must never evict)."""
    conversation = chat.new_conversation(model, num_sinks, window)
    greedy = sampling.sampling_settings(1, temperature=0.0)
    stops = stopping.stop_conditions(1, end_ids=model.end_ids, max_new_tokens=ANSWER_TOKENS)
    conversation = _teach(model, conversation, *stream.example)
    line_positions: dict[int, int] = {}
    records = []
    for message, lines, query in turns(stream, query_every):
        position = int(sharding.to_host(conversation.cache.next_position)[0])
        inputs = chat.turn_input(model, conversation, message)
        if max_tokens is not None and position + len(inputs) + ANSWER_TOKENS > max_tokens:
            break
        line_positions.update(_line_positions(model, inputs, position, lines, stream.values))
        conversation, turn = chat.chat_turn(model, conversation, message, greedy, stops)
        if query is not None:
            asked_at = position + len(inputs)
            records.append({
                "sample": sample, "line": query.line, "asked_after": query.asked_after, "stream_position": asked_at,
                "answer_distance_tokens": asked_at - line_positions[query.line], "expected": query.expected,
                "generated": turn.reply, "answered": answered_value(turn.reply),
                "correct": answered_value(turn.reply) == query.expected,
            })  # fmt: skip
    return records


# An answer is a 5-digit number and the end of the turn, or a sentence around it ("The REGISTER_CONTENT
# in line 17 is <38193>.", 19 SmolLM2 tokens): room for the sentence, cut short of rambling.
ANSWER_TOKENS = 24


def _teach(model: chat.ChatModel, conversation: chat.Conversation, user: str, answer: str) -> chat.Conversation:
    """The worked example fed as a turn whose reply is the right answer (teacher-forced), closed as the
    template closes a turn (`chat.end_of_turn_id`)."""
    inputs = chat.turn_input(model, conversation, user)
    reply_ids = [*model.tokenizer(answer, add_special_tokens=False).input_ids, chat.end_of_turn_id(model)]
    tokens = np.asarray([inputs + reply_ids], np.int32)
    _, cache = feed.prefill(model.params, conversation.cache, tokens, model.config, 256, logits="none")
    written = model.tokenizer.decode(reply_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    messages = [*conversation.messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return chat.Conversation(cache, messages, written)


def _line_positions(model, inputs: list[int], position: int, lines: range, values: list[int]) -> dict[int, int]:
    """Stream position of the first token of each line of a turn whose input starts at `position`."""
    text = model.tokenizer.decode(inputs, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    positions = {}
    for index in lines:
        before = text[: text.index(line_text(index, values[index]))]
        positions[index] = position + len(model.tokenizer(before, add_special_tokens=False).input_ids)
    return positions


# ---------------------------------------------------------------- the experiment (`experiments.streameval`)


def _runs(config) -> list[dict[str, Any]]:
    """Every (method, window, answer distance) of a config, validated before anything is loaded."""
    methods = perplexity.parse_methods(config.method, METHODS)
    windows, distances = _int_list(config.window, "window"), _int_list(config.answer_distance, "answer_distance")
    runs = []
    for method in methods:
        for window in windows if method != "dense" else windows[:1]:
            perplexity.EvalSpec("streaming", config.num_sinks, window)  # checks the cache shape
            for distance in distances:
                check_stream_shape(config.num_lines, config.query_every, distance)
                cache = None if method == "dense" else "{}+{}".format(*cache_shape(method, config.num_sinks, window))
                name = f"{method}-{cache}-d{distance}" if cache else f"dense-d{distance}"
                runs.append({"name": name, "method": method, "window": window, "answer_distance": distance,
                             "cache": cache})  # fmt: skip
    if config.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {config.num_samples}")
    loading.parse_dtype(config.dtype)
    if config.mesh:
        sharding.parse_mesh(config.mesh)
    distributed.parse(config.distributed)
    return runs


def _int_list(value, name: str) -> list[int]:
    items = [item.strip() for item in str(value).split(",") if item.strip()]
    if not items or not all(item.lstrip("-").isdigit() for item in items):
        raise ValueError(f"{name} must be an int or comma-separated ints, got {value!r}")
    return [int(item) for item in items]


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Every run of the config over `num_samples` seeded streams; per run `queries.jsonl` and
    `summary.json`, then `results.md` and the plots in `workdir`. Runs the workdir already finished
    for this config are kept (`finished_runs`), so rerunning rebuilds the report around a redone run."""
    runs = _runs(config)
    distributed.initialize(config.distributed)
    workdir = pathlib.Path(workdir).expanduser()
    finished = finished_runs(workdir, config)
    mesh = sharding.config_mesh(config.mesh)
    model = chat_models.load_chat_model(config.model, config.dtype, mesh, config.chat_template or None)
    _check_windows(model, config, runs)
    dense_tokens = min(config.dense_max_tokens, model.config.max_position_embeddings)
    summaries = []
    for spec in runs:
        if spec["name"] in finished:
            summaries.append(finished[spec["name"]])
            log.log("streameval", f"{spec['name']}: finished in {workdir}, kept")
            continue
        run_dir = workdir / spec["name"]
        records = []
        for sample in range(config.num_samples):
            stream = make_stream(config.num_lines, config.query_every, spec["answer_distance"], config.seed + sample)
            sinks, window, limit = _cache(spec, config.num_sinks, dense_tokens)
            records += run_stream(model, stream, config.query_every, sinks, window, limit, sample)
            log.log(
                "streameval",
                f"{spec['name']} sample {sample}: {sum(r['correct'] for r in records)}/{len(records)} correct so far",
            )
        summary = {
            **spec, "queries": len(records),
            "accuracy": float(np.mean([r["correct"] for r in records])) if records else None,
            "cache": spec["cache"] or f"all (up to {dense_tokens})",
            "max_stream_position": max((r["stream_position"] for r in records), default=0),
        }  # fmt: skip
        if distributed.is_writer():
            run_dir.mkdir(parents=True, exist_ok=True)
            writes.write_text(run_dir / "queries.jsonl", "".join(json.dumps(record) + "\n" for record in records))
            writes.write_json(run_dir / "summary.json", summary)
        summaries.append(summary)
    report = {
        "config": config.to_dict(),
        **distributed.fingerprint(),
        "made_by": provenance.made_by(),
        "runs": summaries,
    }
    if distributed.is_writer():
        writes.write_text(workdir / "results.md", results_table(summaries) + "\n")
        writes.write_json(workdir / "summary.json", report)  # last: the runs it lists are written
        plot(workdir, summaries, report["made_by"])
        print(results_table(summaries), flush=True)
    distributed.barrier("streameval: report written")
    return report


# The config fields that only choose which runs a config makes (not what one run computes).
RUN_SELECTORS = ("method", "window", "answer_distance")
# Differs between the processes of one run (their ids, the coordinator's port); their count is compared instead.
UNCOMPARED_FIELDS = (*RUN_SELECTORS, "distributed")


def finished_runs(workdir: pathlib.Path, config) -> dict[str, dict]:
    """{name: summary} of the runs a workdir's report (its summary.json) lists and whose own files are
    still there, unchanged: `run` keeps them (to add a method or redo one run, delete its directory).
    ValueError if the report was made by a config that differs in more than `UNCOMPARED_FIELDS`, or by
    another number of processes. Reports made before `mesh` existed ran on the default device (mesh "")."""
    report = _read_json(workdir / "summary.json")
    if report is None:
        return {}
    saved = {"mesh": "", **report["config"]}
    differs = sorted(
        field for field in set(saved) | set(config.to_dict())
        if field not in UNCOMPARED_FIELDS and saved.get(field) != config.to_dict().get(field)
    )  # fmt: skip
    processes = (report.get("processes", 1), distributed.fingerprint().get("processes", 1))
    if processes[0] != processes[1]:
        differs.append(f"processes ({processes[0]} there, {processes[1]} now)")
    if differs:
        raise ValueError(
            f"{workdir} holds StreamEval runs of another config (it differs in {', '.join(differs)}); "
            "use another --workdir"
        )
    return {
        summary["name"]: summary for summary in report["runs"]
        if (workdir / summary["name"] / "queries.jsonl").is_file()
        and _read_json(workdir / summary["name"] / "summary.json") == summary
    }  # fmt: skip


def _read_json(path: pathlib.Path) -> Any:
    """The JSON value of a file (None when it does not exist); ValueError naming a file that is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it to recompute what it summarises") from None


def _check_windows(model: chat.ChatModel, config, runs: list[dict]) -> None:
    """ValueError for a run whose recent window cannot hold one line with its question and the answer."""
    text = f"{line_text(99_999, 99_999)}\n{question(99_999)}"
    needed = len(model.tokenizer(text, add_special_tokens=False).input_ids) + ANSWER_TOKENS
    for spec in runs:
        window = cache_shape(spec["method"], config.num_sinks, spec["window"])[1]
        if spec["method"] != "dense" and window < needed:
            raise ValueError(
                f"run {spec['name']}: a window of {window} tokens is too small to hold one line with its question "
                f"and the answer ({needed} tokens with this tokenizer); use a window of at least {needed}"
            )


def cache_shape(method: str, num_sinks: int, window: int) -> tuple[int, int]:
    """(sinks, window slots) of a run's cache: StreamingLLM keeps `num_sinks` + `window`; window attention
    as many slots, all of them recent (0 + num_sinks + window). A run is named by this shape."""
    return perplexity.EvalSpec(method, num_sinks, window).cache_shape(num_sinks + window)


def _cache(spec: dict, num_sinks: int, dense_tokens: int) -> tuple[int, int, int | None]:
    """(sinks, window, token limit) of a run's cache."""
    if spec["method"] == "dense":
        return 0, dense_tokens, dense_tokens
    return (*cache_shape(spec["method"], num_sinks, spec["window"]), None)


def results_table(summaries: list[dict]) -> str:
    lines = ["| run | method | cache | answer distance (lines) | queries | accuracy | stream reached (tokens) |",
             "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for s in summaries:
        accuracy = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
        lines.append(f"| {s['name']} | {s['method']} | {s['cache']} | {s['answer_distance']} | {s['queries']} "
                     f"| {accuracy} | {s['max_stream_position']} |")  # fmt: skip
    return "\n".join(lines)


def _records(workdir: pathlib.Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (workdir / name / "queries.jsonl").read_text().splitlines()]


def plot(workdir: pathlib.Path, summaries: list[dict], made_by: str) -> None:
    """accuracy_vs_position.png (Figure 9: accuracy in bins of stream position, each run at the config's
    first answer distance) and accuracy_vs_distance.png (Table 7: accuracy against the answer distance
    in tokens, per method and cache)."""
    first = summaries[0]["answer_distance"]
    figure, (axes,) = plots.new_figure(1, 1, width=7.0, height=4.0)
    for summary in (s for s in summaries if s["answer_distance"] == first):
        records = _records(workdir, summary["name"])
        if not records:
            continue
        positions = np.array([r["stream_position"] for r in records])
        edges = np.linspace(0, positions.max() + 1, 9)
        bins = np.digitize(positions, edges) - 1
        centres = [(edges[b] + edges[b + 1]) / 2 for b in range(8) if (bins == b).any()]
        accuracy = [
            np.mean([r["correct"] for r, rb in zip(records, bins) if rb == b]) for b in range(8) if (bins == b).any()
        ]
        axes.plot(centres, accuracy, marker="o", label=f"{summary['method']} ({summary['cache']})")
    axes.set_xlabel("stream position of the question (tokens)")
    axes.set_ylabel(f"accuracy (answer {first} lines back)")
    axes.set_ylim(-0.03, 1.03)
    _finish(figure, axes, workdir / "accuracy_vs_position.png", made_by)
    figure, (axes,) = plots.new_figure(1, 1, width=7.0, height=4.0)
    groups: dict[str, list[tuple[float, float]]] = {}
    for summary in summaries:
        records = _records(workdir, summary["name"])
        if records:
            distance = float(np.mean([r["answer_distance_tokens"] for r in records]))
            groups.setdefault(f"{summary['method']} ({summary['cache']})", []).append((distance, summary["accuracy"]))
    for label, points in groups.items():
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xlabel("answer distance (tokens between the line and the question, mean)")
    axes.set_ylabel("accuracy")
    axes.set_ylim(-0.03, 1.03)
    _finish(figure, axes, workdir / "accuracy_vs_distance.png", made_by)


def _finish(figure, axes, path: pathlib.Path, made_by: str) -> None:
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    plots.finish_figure(figure, path, footer=made_by)


if __name__ == "__main__":
    main(run)
