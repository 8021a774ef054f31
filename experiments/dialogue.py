"""The paper's streaming dialogue, measured: a long conversation fed through one cache, turn by turn.

The script is a novel's consecutive paragraphs (Pride and Prejudice opens with a dialogue): paragraph
2k is the user's turn k and paragraph 2k + 1 its reference reply. The conversation is one token stream,
built as the chat program feeds it (`streamjax.stream.chat`): each turn adds, through the model's chat
template, the user's message and the generation prompt, then the reply and the end-of-turn id. Over
that stream, for dense attention (as far as the model's positions reach), window attention and
StreamingLLM (`evaluation` methods, chunk route):

(a) per-turn perplexity of the reference reply given the conversation so far (teacher-forced);
(b) at a few turns, the reply each method generates greedily from the same conversation;
(c) at those turns, the per-token decode latency and the process's memory.

`run(config, workdir)` is what `python -m experiments.dialogue` calls (fields: configs/dialogue.py).

Devices: `config.mesh` lays the model and every method's cache over a ("data", "model") mesh
(`streamjax.model.sharding`); with `config.distributed` the mesh spans several processes
(`streamjax.runs.distributed`), each computing everything, and process 0 writes the workdir's files
(the memory it reports is its own).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from typing import Any

import jax
import numpy as np

from experiments.program import main
from streamjax.files import chat_models, corpora, loading
from streamjax.model import sharding
from streamjax.runs import distributed, log, machine, plots, provenance, writes
from streamjax.stream import chat, generation, perplexity, sampling, stopping

METHODS = ("dense", "window", "streaming")
SMOOTHING_TURNS = 10  # reply_ppl.png draws the mean over this many turns


@dataclasses.dataclass(frozen=True)
class DialogueStream:
    """The conversation as one token stream.

    tokens: [N] int32 every token fed, in order; inputs[k] = (start, stop) of turn k's input (the
    template's increment up to the generation prompt); replies[k] = (start, stop) of its reference
    reply (ending with the end-of-turn id), right after its input.
    """

    tokens: np.ndarray
    inputs: list[tuple[int, int]]
    replies: list[tuple[int, int]]


def script_turns(text: str, num_turns: int, max_chars: int) -> list[tuple[str, str]]:
    """(user message, reference reply) pairs from the first 2 * num_turns paragraphs of `text`, each
    paragraph on one line and cut after its last sentence end within `max_chars` characters."""
    paragraphs = [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]
    paragraphs = [_cut(paragraph, max_chars) for paragraph in paragraphs if not _is_heading(paragraph)]
    if len(paragraphs) < 2 * num_turns:
        raise ValueError(f"the text has {len(paragraphs)} paragraphs, {2 * num_turns} are needed for {num_turns} turns")
    return [(paragraphs[2 * k], paragraphs[2 * k + 1]) for k in range(num_turns)]


def _is_heading(paragraph: str) -> bool:
    return len(paragraph) < 40 and (paragraph.isupper() or paragraph.startswith("Chapter"))


def _cut(paragraph: str, max_chars: int) -> str:
    if len(paragraph) <= max_chars:
        return paragraph
    ends = [match.end() for match in re.finditer(r"[.!?]\"?\s", paragraph[: max_chars + 1])]
    return paragraph[: ends[-1]].strip() if ends else paragraph[:max_chars]


def dialogue_stream(model: chat.ChatModel, turns: list[tuple[str, str]]) -> DialogueStream:
    """The token stream of `turns` fed as the chat program feeds a conversation, each reference reply
    tokenized and closed by the template's end of turn (`chat.end_of_turn_id`), as if the model had
    generated it (see `chat.turn_input`)."""
    end_id = chat.end_of_turn_id(model)
    conversation = chat.Conversation(cache=None, messages=[])
    tokens: list[int] = []
    inputs, replies = [], []
    for user, reply in turns:
        fed = chat.turn_input(model, conversation, user)
        inputs.append((len(tokens), len(tokens) + len(fed)))
        reply_ids = [*model.tokenizer(reply, add_special_tokens=False).input_ids, end_id]
        replies.append((inputs[-1][1], inputs[-1][1] + len(reply_ids)))
        tokens += fed + reply_ids
        written = model.tokenizer.decode(reply_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        messages = [*conversation.messages, {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        conversation = chat.Conversation(None, messages, written)
    return DialogueStream(np.asarray(tokens, np.int32), inputs, replies)


def reply_nll(nll: np.ndarray, stream: DialogueStream) -> list[float | None]:
    """Mean NLL of each turn's reply tokens from the NLL [M] of predicting tokens 1..M of the stream
    (None past M: a method evaluated over a prefix only)."""
    return [float(nll[start - 1 : stop - 1].mean()) if stop - 1 <= len(nll) else None for start, stop in stream.replies]


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Build the conversation, evaluate every method over it, generate at the sample turns; write
    dialogue.json, results.md, replies.md and the plots to `workdir`."""
    methods = _check_config(config)
    distributed.initialize(config.distributed)
    workdir = pathlib.Path(workdir).expanduser()
    turns = script_turns(corpora.load_text(config.data), config.num_turns, config.max_message_chars)
    mesh = sharding.config_mesh(config.mesh)
    model = chat_models.load_chat_model(config.model, config.dtype, mesh, config.chat_template or None)
    stream = dialogue_stream(model, turns)
    if distributed.is_writer():
        workdir.mkdir(parents=True, exist_ok=True)
    log.log("dialogue", f"{len(turns)} turns, {len(stream.tokens)} tokens; methods {', '.join(methods)}")
    results = {method: _run_method(model, stream, method, config) for method in methods}
    summary = _summary(config, turns, stream, results)
    if distributed.is_writer():
        writes.write_json(workdir / "dialogue.json", summary)
        writes.write_text(workdir / "results.md", results_table(summary) + "\n")
        writes.write_text(workdir / "replies.md", replies_table(summary) + "\n")
        plot(summary, workdir)
        print(results_table(summary), flush=True)
    distributed.barrier("dialogue: results written")
    return summary


def _check_config(config) -> list[str]:
    methods = perplexity.parse_methods(config.method, METHODS)
    if config.num_turns < 2 or config.max_message_chars < 20:
        raise ValueError("num_turns must be >= 2 and max_message_chars >= 20")
    perplexity.EvalSpec("streaming", config.num_sinks, config.window, "chunk", config.chunk_size)
    if any(turn < 0 or turn >= config.num_turns for turn in config.sample_turns):
        raise ValueError(f"sample_turns {tuple(config.sample_turns)} must lie in [0, num_turns = {config.num_turns})")
    loading.parse_dtype(config.dtype)
    if config.mesh:
        sharding.parse_mesh(config.mesh)
    distributed.parse(config.distributed)
    return methods


def _run_method(model: chat.ChatModel, stream: DialogueStream, method: str, config) -> dict[str, Any]:
    """One method over the stream: NLL of every prediction and the samples at `config.sample_turns`."""
    length = len(stream.tokens)
    if method == "dense":
        length = min(length, config.dense_max_tokens, model.config.max_position_embeddings)
    tokens = stream.tokens[:length]
    spec = perplexity.EvalSpec(method, config.num_sinks, config.window, "chunk", config.chunk_size)
    state = perplexity.init_state(model.config, spec, length, perplexity.params_dtype(model.params))
    if model.mesh is not None and state.cache is not None:
        state.cache = sharding.shard_cache(state.cache, model.mesh)
    nll, samples = [], []
    for turn in sorted(config.sample_turns):
        at = stream.inputs[turn][1] - 1  # the generation prompt's last token: fed when the sample is drawn
        if at >= length - 1:
            break
        if at > state.position:
            state, segment = perplexity.score_next(model.params, model.config, tokens, spec, state, at - state.position)
            nll.append(segment)
        samples.append({"turn": turn, **_sample(model, state.cache, int(tokens[at]), config)})
        log.log("dialogue", f"{method}: turn {turn} at token {at}: {samples[-1]['reply'][:60]!r}")
    state, segment = perplexity.score_next(model.params, model.config, tokens, spec, state, length)
    nll.append(segment)
    nll = np.concatenate(nll)
    cache = "all" if method == "dense" else "{}+{}".format(*spec.cache_shape(length))
    return {"num_tokens": length, "cache": cache, "nll": nll, "reply_nll": reply_nll(nll, stream), "samples": samples}


def _sample(model: chat.ChatModel, cache, last_token: int, config) -> dict[str, Any]:
    """A greedy reply from a copy of `cache` after feeding `last_token`, with its decode speed and memory."""
    copy = jax.tree.map(lambda array: array.copy(), cache)
    stops = stopping.stop_conditions(1, end_ids=model.end_ids, max_new_tokens=config.sample_tokens)
    result = generation.generate(
        model.params, copy, [[last_token]], model.config, sampling.sampling_settings(1, temperature=0.0), stops,
        chunk_size=1, block_size=16,
    )  # fmt: skip
    stats, ids = result.stats, result.tokens[0].tolist()
    steady = stats["decode_seconds"] - stats["decode_compile_seconds"]
    return {
        "position": int(sharding.to_host(cache.next_position)[0]) + 1,
        "reply": model.tokenizer.decode(ids[:-1] if result.reasons[0] == "end_id" else ids, skip_special_tokens=True),
        "decode_ms_per_token": 1e3 * steady / max(stats["decode_steps"], 1),
        "resident_bytes": machine.resident_bytes(),
    }


def _summary(config, turns, stream: DialogueStream, results: dict) -> dict[str, Any]:
    capacity = config.num_sinks + config.window
    per_turn = [
        {"turn": k, "reply_start": start, "user": user, "reference": reply,
         **{f"{method}_nll": result["reply_nll"][k] for method, result in results.items()}}
        for k, ((user, reply), (start, _)) in enumerate(zip(turns, stream.replies))
    ]  # fmt: skip
    return {
        "config": config.to_dict(), "made_by": provenance.made_by(), "num_tokens": len(stream.tokens),
        "capacity": capacity,
        "methods": {
            method: {"num_tokens": result["num_tokens"], "cache": result["cache"], "samples": result["samples"],
                     "mean_nll": float(np.mean(result["nll"], dtype=np.float64))}
            for method, result in results.items()
        },
        "turns": per_turn,
    }  # fmt: skip


def _mean_ppl(values: list[float | None]) -> str:
    known = [value for value in values if value is not None]
    return f"{math.exp(np.mean(known)):.2f}" if known else "-"


def results_table(summary: dict) -> str:
    """Mean per-turn reply perplexity (exp of the mean of turns' mean NLL) before the cache first evicts,
    after it, and past the model's positions, per method."""
    capacity, turns = summary["capacity"], summary["turns"]
    limit = summary["methods"].get("dense", {}).get("num_tokens", summary["num_tokens"])
    spans = {
        f"turns within the first {capacity} tokens": lambda t: t["reply_start"] < capacity,
        f"turns from {capacity} to {limit} tokens": lambda t: capacity <= t["reply_start"] < limit,
        f"turns past {limit} tokens": lambda t: t["reply_start"] >= limit,
    }
    methods = list(summary["methods"])
    lines = ["| turns | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for name, chosen in spans.items():
        row = [_mean_ppl([t[f"{method}_nll"] for t in turns if chosen(t)]) for method in methods]
        lines.append(f"| {name} ({sum(map(chosen, turns))}) | " + " | ".join(row) + " |")
    return "\n".join(lines)


def replies_table(summary: dict) -> str:
    """The generated replies at the sample turns, side by side, with decode speed and memory."""
    lines = []
    for turn in sorted({sample["turn"] for m in summary["methods"].values() for sample in m["samples"]}):
        user = summary["turns"][turn]["user"]
        lines += [f"### Turn {turn}", "", f"**User:** {user}", "", "| method | position | reply | ms/token | memory |",
                  "|---|---:|---|---:|---:|"]  # fmt: skip
        for method, result in summary["methods"].items():
            for sample in (s for s in result["samples"] if s["turn"] == turn):
                reply = sample["reply"].replace("|", "\\|").replace("\n", " ")
                lines.append(
                    f"| {method} | {sample['position']} | {reply} | {sample['decode_ms_per_token']:.1f} "
                    f"| {sample['resident_bytes'] / 2**20:.0f} MiB |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, workdir: pathlib.Path) -> None:
    """reply_ppl.png: per-turn reply log perplexity (mean of 10 turns) against stream position;
    decode.png: per-token decode latency and memory at the sample turns."""
    figure, (axes,) = plots.new_figure(1, 1, width=7.0, height=4.2)
    positions = np.array([t["reply_start"] for t in summary["turns"]])
    for method in summary["methods"]:
        values = np.array([np.nan if t[f"{method}_nll"] is None else t[f"{method}_nll"] for t in summary["turns"]])
        known = ~np.isnan(values)
        kernel = np.ones(min(SMOOTHING_TURNS, len(values)))  # "same" keeps len(values) only if the kernel fits
        counts = np.convolve(known, kernel, "same")
        smooth = np.convolve(np.where(known, values, 0.0), kernel, "same") / np.maximum(counts, 1)
        axes.plot(positions, np.where(np.isnan(values), np.nan, smooth), label=method, linewidth=1.2)
    axes.axvline(summary["capacity"], color="0.6", linestyle=":", linewidth=1)
    axes.set_xlabel("stream position of the reply (tokens)")
    axes.set_ylabel(f"reply log PPL (mean of {SMOOTHING_TURNS} turns)")
    caches = ", ".join(f"{method} {result['cache']}" for method, result in summary["methods"].items())
    axes.set_title(f"{summary['config']['model']}: streaming dialogue, caches {caches}", fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    plots.finish_figure(figure, workdir / "reply_ppl.png", footer=summary["made_by"])
    _plot_decode(summary, workdir)


def _plot_decode(summary: dict, workdir: pathlib.Path) -> None:
    figure, (latency, memory) = plots.new_figure(2, 1, width=8.0, height=3.4)
    for method, result in summary["methods"].items():
        samples = result["samples"]
        x = [sample["position"] for sample in samples]
        latency.plot(x, [sample["decode_ms_per_token"] for sample in samples], marker="o", label=method)
        memory.plot(x, [sample["resident_bytes"] / 2**20 for sample in samples], marker="o", label=method)
    for axes, label in ((latency, "decode ms per token"), (memory, "process memory (MiB)")):
        axes.set_xlabel("stream position (tokens)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    plots.finish_figure(figure, workdir / "decode.png", footer=summary["made_by"])


if __name__ == "__main__":
    main(run)
