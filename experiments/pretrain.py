"""Pre-training with attention sinks (the paper's Table 3): train variants alike, then stream them.

`run(config, workdir)` is what `python -m experiments.pretrain` calls; the config fields are
documented in `configs/pretrain_sink.py`. For each seed of `seeds`, every variant is the same Llama-shaped
model trained alike and differs in one thing:

    vanilla      standard softmax, samples of plain text
    sink_token   a learnable sink token (one extra vocabulary entry, `<sink>`) first in every training
                 sample and every evaluated stream (data, not attention)
    zero_sink    SoftMax-off-by-one: one extra logit 0 with a zero value (`ModelConfig.softmax`)
    sink_logit   one learned logit per head with a zero value (gpt-oss's sinks)

What is controlled, per seed: every param a variant shares with another starts bitwise equal (each param
is drawn from its own path, `params.init_params`; `sink_logit`'s extra logits start at 0, so at step 0 it
computes what `zero_sink` computes); every variant reads the same text windows in the same order (the
sampler's key and bound are the same; `sink_token` puts `<sink>` before the same window) and predicts the
same tokens from the same text (`training.samples_to_batch`); the held-out loss covers the same windows
and targets; the streams score the same text tokens. Each number is reported per seed and as the mean
over seeds with its range (min..max) and standard deviation (ddof 1).

Data: the corpus text is cut at a paragraph break into training text and the last `heldout_fraction`
of it, which training never sees. A byte-level BPE tokenizer of `vocab_size` entries (with `<sink>`)
is trained on the training text only and saved once in the workdir.

Each trained variant is evaluated with the exact streaming route (`streamjax.stream.perplexity`, chunk route)
over the first `eval_tokens` held-out tokens at the cache layouts S+(W-S) of `eval_sinks` with S + W =
`eval_cache` (0 sinks: window attention), scoring the same targets for every variant (the sink token's
own prediction of the first text token is dropped). The same evaluation runs every `evaluate_every`
steps during training, which measures at what budget window attention starts to fail.

Several processes (`config.distributed`, `streamjax.runs.distributed`) run one job over a mesh that spans
their devices: each reads the corpus and runs every step alike (`streamjax.training`), process 0 trains and
saves the tokenizer and writes every file below, and each evaluates on the params gathered onto it. The
process count is part of the workdir's fingerprint: a run resumes only with as many processes.

Workdir layout:
    config.json, lock        the config and its fingerprint (checked on restart); the process lock
                             (in a distributed run also lock.process<i>, one per other process)
    tokenizer/               the trained tokenizer (transformers files)
    seed<s>/<variant>/checkpoints/   orbax steps of the training state while training (`streamjax.training`)
    seed<s>/<variant>/model/         the trained model: config.json, model.safetensors and tokenizer files,
                             loadable by `experiments.ppl --config.model=...` (vanilla and sink_token
                             also by transformers' LlamaForCausalLM; sink_token's tokenizer adds <sink>)
    seed<s>/<variant>/summary.json   training history, evaluations, throughput; written last (its
                             presence means the variant is done)
    results.md, summary.json, loss.png   the tables (the paper's Table 3 layout: mean and range over seeds,
                             then per seed), all numbers, the plot (means over seeds)
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.program import main
from streamjax import training
from streamjax.files import corpora, export, loading
from streamjax.model import costs, sharding
from streamjax.model.config import ModelConfig
from streamjax.runs import distributed, machine, plots, provenance, signals, writes
from streamjax.runs import workdir as workdir_lib
from streamjax.stream import perplexity

VARIANTS = {  # name: (sink token first in every sample and stream, softmax)
    "vanilla": (False, "standard"),
    "sink_token": (True, "standard"),
    "zero_sink": (False, "zero_sink"),
    "sink_logit": (False, "sink_logit"),
}
SINK_TOKEN = "<sink>"
SPECIAL_TOKENS = ("<|endoftext|>", SINK_TOKEN)
# Fields that change no number a run computes: a restart may change them. `distributed` says how to join the
# processes (a coordinator's address changes between restarts); their count is fingerprinted on its own.
UNFINGERPRINTED_FIELDS = ("variants", "seeds", "checkpoint_every", "matmul_repeats", "distributed")
LATER_FIELD_DEFAULTS = {"dtype": "float32"}


def parse_variants(spec: str) -> list[str]:
    """The variants of a comma-separated list, each one of `VARIANTS`, none twice."""
    names = [name.strip() for name in str(spec).split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if not names or unknown:
        raise ValueError(f"unknown variant {(unknown or [spec])[0]!r}; choose from {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"variants {spec!r} list a variant twice")
    return names


def parse_seeds(spec: str) -> list[int]:
    """The seeds of a comma-separated list ("0,1,2"), each a non-negative integer, none twice."""
    try:
        seeds = [int(part) for part in str(spec).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"seeds must be comma-separated integers, got {spec!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {spec!r} must name one or more distinct integers >= 0")
    return seeds


def parse_sinks(spec: str, cache: int) -> list[int]:
    """The sink counts of `eval_sinks` ("0,1,2,4"), each in [0, cache)."""
    try:
        sinks = [int(part) for part in str(spec).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"eval_sinks must be comma-separated integers, got {spec!r}") from None
    if not sinks or any(not 0 <= s < cache for s in sinks):
        raise ValueError(f"eval_sinks {spec!r} must name sink counts in [0, eval_cache={cache})")
    return sinks


def model_config(config, variant: str) -> ModelConfig:
    """The Llama-shaped ModelConfig of `config.model` for `variant` (its softmax), with `vocab_size`
    entries and the positions a sample fills (`sample_length`, one more with the sink token first)."""
    m = config.model
    return ModelConfig(
        family="llama",
        vocab_size=config.vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.hidden_size // m.num_heads,
        intermediate_size=m.intermediate_size,
        norm_eps=1e-5,
        tie_embeddings=m.tie_embeddings,
        max_position_embeddings=config.sample_length + (1 if VARIANTS[variant][0] else 0),
        rope_theta=float(m.rope_theta),
        softmax=VARIANTS[variant][1],
    )


def train_config(config, sink_token: int | None, seed: int) -> training.TrainConfig:
    return training.TrainConfig(
        batch_size=config.batch_size,
        sample_length=config.sample_length,
        steps=config.steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        final_learning_rate_ratio=config.final_learning_rate_ratio,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
        sink_token=sink_token,
        seed=seed,
    )


def check_config(config) -> list[str]:
    """The variants to run, after checking every field that can be checked without data or devices (JAX is
    not touched: `distributed.initialize` comes after); ValueError else."""
    variants = parse_variants(config.variants)
    parse_seeds(config.seeds)
    parse_sinks(config.eval_sinks, config.eval_cache)
    if not 0 < config.heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {config.heldout_fraction}")
    if config.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (the bytes and the special tokens)")
    for name in ("eval_tokens", "eval_cache", "checkpoint_every", "chunk_size", "heldout_samples"):
        if config[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {config[name]}")
    if config.evaluate_every < 0:
        raise ValueError(f"evaluate_every must be >= 0 (0: only after training), got {config.evaluate_every}")
    if config.model.hidden_size % config.model.num_heads:
        raise ValueError(f"hidden_size {config.model.hidden_size} is not a multiple of num_heads")
    loading.parse_dtype(config.dtype)
    if config.mesh:
        sharding.parse_mesh(config.mesh)
    distributed.parse(config.distributed)
    check_training(config, variants, None)
    return variants


def check_training(config, variants: list[str], mesh) -> None:
    """The ModelConfig's and the TrainConfig's own checks of every variant, before any data is read; with
    `mesh`, also that the batch splits over its data axis."""
    for variant in variants:
        sink_token = 1 if VARIANTS[variant][0] else None
        training.check_train_config(train_config(config, sink_token, 0), model_config(config, variant), 1 << 62, mesh)


def split_text(text: str, heldout_fraction: float) -> tuple[str, str]:
    """(training text, held-out text): cut at the first paragraph break after (1 - fraction) of the text."""
    cut = text.find("\n\n", int(len(text) * (1 - heldout_fraction)))
    if cut < 0:
        raise ValueError("the corpus has no paragraph break in its last part to cut the held-out text at")
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer (transformers' `PreTrainedTokenizerFast`) of `vocab_size` entries trained
    on `text`, with `SPECIAL_TOKENS` first; it adds no special token to a call."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpora.text_pieces(iter([text])), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIAL_TOKENS[0])


def with_sink_token(tokenizer):
    """A copy of `tokenizer` that puts `<sink>` (as its BOS) before the tokens of every call."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    sink = backend.token_to_id(SINK_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SINK_TOKEN} $A", special_tokens=[(SINK_TOKEN, sink)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SINK_TOKEN, eos_token=SPECIAL_TOKENS[0])


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids int32 [N] of `text`, tokenized in paragraph-aligned pieces (`corpora.text_pieces`)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(
        list(corpora.text_pieces(iter([text]))), add_special_tokens=False
    )
    return np.concatenate([np.asarray(encoding.ids, np.int32) for encoding in encodings])


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The tokenized data of a run: training tokens, held-out tokens and the tokenizer."""

    train: np.ndarray
    heldout: np.ndarray
    tokenizer: Any

    @property
    def sink_token(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(SINK_TOKEN)


def prepare_corpus(config, workdir: pathlib.Path) -> Corpus:
    """Split the corpus, train the tokenizer on the training text unless the workdir holds it (process 0
    trains and saves it; every process then reads the saved one) and tokenize both parts; ValueError when
    the held-out text is shorter than what is evaluated."""
    from transformers import PreTrainedTokenizerFast

    train_text, heldout_text = split_text(corpora.load_text(config.data), config.heldout_fraction)
    saved = workdir / "tokenizer"
    if distributed.is_writer() and not (saved / "tokenizer.json").is_file():
        partial = workdir / "tokenizer.partial"
        shutil.rmtree(partial, ignore_errors=True)
        train_tokenizer(train_text, config.vocab_size).save_pretrained(partial)
        writes.fsync_tree(partial)
        partial.rename(saved)
        writes.fsync(workdir)
    distributed.barrier("pretrain: tokenizer saved")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(saved)
    corpus = Corpus(tokenize(tokenizer, train_text), tokenize(tokenizer, heldout_text), tokenizer)
    for name, tokens in (("training", corpus.train), ("held-out", corpus.heldout)):  # each process read its own
        digest = np.frombuffer(bytes.fromhex(provenance.tokens_sha256(tokens)), np.uint8)
        distributed.same_everywhere(digest, f"the {name} tokens (their SHA-256; is the corpus the same on every host?)")
    needed = max(config.eval_tokens, config.sample_length + 1)
    if corpus.heldout.shape[0] < needed:
        raise ValueError(
            f"the held-out text has {corpus.heldout.shape[0]} tokens, fewer than eval_tokens or one sample "
            f"({needed}): raise heldout_fraction or lower eval_tokens"
        )
    return corpus


def layout_name(num_sinks: int, cache: int) -> str:
    return f"{num_sinks}+{cache - num_sinks}"


def stream_ppl(params: dict, config: ModelConfig, corpus: Corpus, run_config, sink_token: bool) -> dict[str, float]:
    """Perplexity over the first `eval_tokens` held-out tokens at each cache layout of `eval_sinks`
    (exact streaming, chunk route); a sink-token model reads `<sink>` first, whose own prediction of
    text token 0 is not scored, so every variant scores text tokens 1 .. eval_tokens - 1."""
    text = corpus.heldout[: run_config.eval_tokens]
    stream = np.concatenate([[corpus.sink_token], text]).astype(np.int32) if sink_token else text
    results = {}
    for num_sinks in parse_sinks(run_config.eval_sinks, run_config.eval_cache):
        window = run_config.eval_cache - num_sinks
        spec = perplexity.EvalSpec("streaming", num_sinks, window, "chunk", run_config.chunk_size)
        nll = perplexity.evaluate(params, config, stream, spec)[1 if sink_token else 0 :]
        results[layout_name(num_sinks, run_config.eval_cache)] = math.exp(float(np.mean(nll, dtype=np.float64)))
    return results


def fingerprint(config) -> dict[str, Any]:
    """What makes a run's numbers: the config's fields (`comparable`) and, in a distributed run, its process
    count (`distributed.fingerprint`), so that a restart with another count is refused."""
    return {**comparable(provenance.plain_config(config)), **distributed.fingerprint()}


def comparable(fields: dict[str, Any]) -> dict[str, Any]:
    """The fingerprinted fields of a config's (or of a fingerprint saved before); a field added later is left
    out at its default (`LATER_FIELD_DEFAULTS`), so that workdirs made before it still match."""
    return {
        key: value
        for key, value in fields.items()
        if key not in UNFINGERPRINTED_FIELDS and LATER_FIELD_DEFAULTS.get(key, ...) != value
    }


def run(config, workdir, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every variant of `config` for every seed, resuming what `workdir` holds; the
    summary dict. In a distributed run (`config.distributed`) every process calls it alike; process 0
    writes the workdir's files."""
    variants = check_config(config)
    distributed.initialize(config.distributed)
    workdir = pathlib.Path(workdir).expanduser().resolve()
    check_workdir(workdir, config)
    corpora.corpus_files(config.data)
    mesh = sharding.config_mesh(config.mesh)
    check_training(config, variants, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lib.workdir_lock(workdir), signals.StopRequests() as stop:
        if distributed.is_writer() and not (workdir / "config.json").is_file():
            writes.write_json(workdir / "config.json", {"fingerprint": fingerprint(config)})
        distributed.barrier("pretrain: config.json")
        corpus = prepare_corpus(config, workdir)
        matmul = machine.measure_matmul(2048, np.float32, config.matmul_repeats)["flops_per_s"]
        summaries = {
            seed: {
                variant: run_variant(
                    config, variant, seed, corpus, workdir / f"seed{seed}" / variant, mesh, matmul, progress, stop
                )
                for variant in variants
            }
            for seed in parse_seeds(config.seeds)
        }
        return report(config, workdir, summaries)


def check_workdir(workdir: pathlib.Path, config) -> None:
    """Raise if `workdir` is a file or holds a run of another config (naming the fields that differ)."""
    saved = workdir_lib.saved_fingerprint(workdir)
    if saved is not None:
        workdir_lib.check_fingerprint(workdir, comparable(saved), json.loads(json.dumps(fingerprint(config))))


def run_variant(
    config, variant, seed: int, corpus: Corpus, directory: pathlib.Path, mesh, matmul_flops, progress, stop
) -> dict:
    """Train one variant from `seed` (resuming), evaluate it, save its model; its summary (read back if done)."""
    if (directory / "summary.json").is_file():
        return writes.read_json(directory / "summary.json", f"delete {directory} to train the variant again", ["final"])
    sink_first = VARIANTS[variant][0]
    model = model_config(config, variant)
    tc = train_config(config, corpus.sink_token if sink_first else None, seed)
    windows = training.heldout_windows(corpus.heldout, tc, config.heldout_samples)

    def evaluate(params: dict) -> dict:
        params = evaluation_params(params)
        return {
            "heldout_loss": training.heldout_loss(params, model, windows, tc),
            "ppl": stream_ppl(params, model, corpus, config, sink_first),
        }

    meta = {
        "fingerprint": fingerprint(config),
        "seed": seed,
        "variant": variant,
        "tokens_sha256": provenance.tokens_sha256(corpus.train),
    }
    dtype = loading.parse_dtype(config.dtype)
    state, history = training.train(
        model, tc, corpus.train, directory / "checkpoints", meta=meta, mesh=mesh, dtype=dtype,
        checkpoint_every=config.checkpoint_every, evaluate=evaluate, evaluate_every=config.evaluate_every,
        progress=progress, stop=stop, description=f"seed {seed} {variant}",
    )  # fmt: skip
    tokenizer = with_sink_token(corpus.tokenizer) if sink_first else corpus.tokenizer
    trained = jax.tree.map(sharding.to_host, state.params)  # every process: a gather across them
    summary = {
        "variant": variant,
        "seed": seed,
        "softmax": model.softmax,
        "sink_token": tc.sink_token,
        "final": history["evaluations"][-1],
        "throughput": throughput(trained, model, tc, history, matmul_flops),
        "history": history,
    }
    distributed.barrier(f"pretrain: seed {seed} {variant} trained")  # every process is done with the checkpoints
    if distributed.is_writer():
        export.save_model(directory / "model", trained, model, tokenizer=tokenizer)
        writes.write_json(directory / "summary.json", summary)  # last: its presence means the variant is done
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
    distributed.barrier(f"pretrain: seed {seed} {variant} written")
    return summary


def evaluation_params(params: dict) -> dict:
    """The params an evaluation reads: `params` themselves in one process (on their mesh, if any); gathered
    whole onto every process when they span several, so that each evaluates on its own default device and
    every process computes the same numbers (process 0's are written)."""
    if jax.process_count() == 1:
        return params
    return jax.tree.map(lambda leaf: jnp.asarray(sharding.to_host(leaf)), params)


def throughput(params: dict, config: ModelConfig, tc: training.TrainConfig, history: dict, matmul_flops: float) -> dict:
    """Training tokens/s (median step after the first two, which compile) and FLOP/s against the measured
    [2048 x 2048] float32 matmul: 3x the forward FLOPs (`costs.flops_per_token`, every key of the sample);
    a token is a position of a sample (with the sink token, one more per sample)."""
    seconds = float(np.median(history["seconds"][2:] or history["seconds"]))
    tokens = tc.batch_size * tc.input_length
    flops = 3 * costs.flops_per_token(params, config, tc.input_length)
    return {
        "median_step_s": seconds,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / seconds,
        "flops_per_token": flops,
        "flops_per_s": flops * tokens / seconds,
        "matmul_flops_per_s": matmul_flops,
        "matmul_fraction": flops * tokens / seconds / matmul_flops,
    }


def report(config, workdir: pathlib.Path, summaries: dict[int, dict[str, dict]]) -> dict[str, Any]:
    """Write results.md (the final table and the budget table as means over seeds, then the final table of
    each seed), summary.json and loss.png from the summaries of every seed's variants (process 0 only); the
    summary dict."""
    layouts = [layout_name(s, config.eval_cache) for s in parse_sinks(config.eval_sinks, config.eval_cache)]
    made_by = provenance.made_by()
    finals = final_stats(summaries, layouts)
    result = {
        "config": config.to_dict(),
        "made_by": made_by,
        "mean": finals,
        "seeds": {str(seed): {n: _compact(s) for n, s in variants.items()} for seed, variants in summaries.items()},
    }
    if not distributed.is_writer():
        return result
    seeds = ", ".join(str(seed) for seed in summaries)
    per_seed = "".join(f"Seed {seed}:\n\n{final_table(variants, layouts)}\n" for seed, variants in summaries.items())
    writes.write_text(
        workdir / "results.md",
        f"Perplexity over {config.eval_tokens} held-out tokens at each cache layout (S+W), after {config.steps} "
        f"steps: the mean over seeds {seeds} (min..max in brackets).\n\n{mean_table(finals, layouts)}\n"
        f"During training: perplexity at {layouts[0]} / at {layouts[-1]} (window attention / with sinks) after each "
        f"number of steps, the mean over seeds {seeds}.\n\n{budget_table(summaries, layouts, config)}\n"
        f"Each seed.\n\n{per_seed}made by {made_by}\n",
    )
    print(mean_table(finals, layouts))
    histories = {name: mean_history([variants[name]["history"] for variants in summaries.values()]) for name in finals}
    title = f"{config.steps} steps of {config.batch_size} x {config.sample_length} tokens, mean over seeds {seeds}"
    plots.plot_training(workdir / "loss.png", histories, layouts, title=title, footer=made_by)
    writes.write_json(workdir / "summary.json", result)
    return result


def spread(values: list[float]) -> dict[str, Any]:
    """The mean, standard deviation over seeds (ddof 1; 0 for one seed), min and max of `values`, and them."""
    values = [float(value) for value in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "min": min(values), "max": max(values), "per_seed": values}


def final_stats(summaries: dict[int, dict[str, dict]], layouts: list[str]) -> dict[str, dict]:
    """Per variant, the `spread` over seeds of the final held-out loss and of the perplexity at each layout."""
    names = list(next(iter(summaries.values())))
    finals = {name: [variants[name]["final"] for variants in summaries.values()] for name in names}
    return {
        name: {
            "heldout_loss": spread([final["heldout_loss"] for final in rows]),
            "ppl": {layout: spread([final["ppl"][layout] for final in rows]) for layout in layouts},
        }
        for name, rows in finals.items()
    }


def mean_table(finals: dict[str, dict], layouts: list[str]) -> str:
    """The paper's Table 3 layout over seeds: per variant, the mean (min..max) of the held-out loss and of
    the perplexity per layout."""
    lines = ["| variant | held-out loss | " + " | ".join(layouts) + " |", "|---|---:|" + "---:|" * len(layouts)]
    for name, stats in finals.items():
        loss = stats["heldout_loss"]
        ppl = " | ".join(_mean_range(stats["ppl"][layout], ".2f") for layout in layouts)
        lines.append(f"| {name} | {_mean_range(loss, '.4f')} | {ppl} |")
    return "\n".join(lines) + "\n"


def _mean_range(stats: dict, spec: str) -> str:
    return f"{stats['mean']:{spec}} ({stats['min']:{spec}}..{stats['max']:{spec}})"


def final_table(summaries: dict[str, dict], layouts: list[str]) -> str:
    """One seed's Table 3: one row per variant, the held-out loss and the perplexity per layout."""
    lines = ["| variant | held-out loss | " + " | ".join(layouts) + " |", "|---|---:|" + "---:|" * len(layouts)]
    for name, summary in summaries.items():
        ppl = " | ".join(f"{summary['final']['ppl'][layout]:.2f}" for layout in layouts)
        lines.append(f"| {name} | {summary['final']['heldout_loss']:.4f} | {ppl} |")
    return "\n".join(lines) + "\n"


def budget_table(summaries: dict[int, dict[str, dict]], layouts: list[str], config) -> str:
    """One row per evaluation step: text tokens trained on and, per variant, the mean over seeds of
    "ppl at the first layout / at the last"."""
    names = list(next(iter(summaries.values())))
    means = {name: mean_evaluations([v[name]["history"]["evaluations"] for v in summaries.values()]) for name in names}
    by_step = {name: {row["step"]: row["ppl"] for row in means[name]} for name in names}
    lines = ["| step | tokens | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for step in sorted(set.intersection(*(set(rows) for rows in by_step.values()))):
        cells = " | ".join(f"{by_step[n][step][layouts[0]]:.1f} / {by_step[n][step][layouts[-1]]:.1f}" for n in names)
        lines.append(f"| {step} | {step * config.batch_size * config.sample_length:,} | {cells} |")
    return "\n".join(lines) + "\n"


def mean_evaluations(runs: list[list[dict]]) -> list[dict]:
    """The evaluations [{step, heldout_loss, ppl: {layout: value}}] averaged over runs, at the steps all have."""
    by_step = [{row["step"]: row for row in rows} for rows in runs]
    steps = sorted(set.intersection(*(set(rows) for rows in by_step)))
    return [
        {
            "step": step,
            "heldout_loss": float(np.mean([rows[step]["heldout_loss"] for rows in by_step])),
            "ppl": {
                layout: float(np.mean([rows[step]["ppl"][layout] for rows in by_step]))
                for layout in by_step[0][step]["ppl"]
            },
        }
        for step in steps
    ]


def mean_history(histories: list[dict]) -> dict:
    """Per-step training `loss` and `evaluations` averaged over runs of the same length (for the plot)."""
    return {
        "loss": np.mean([history["loss"] for history in histories], axis=0).tolist(),
        "evaluations": mean_evaluations([history["evaluations"] for history in histories]),
    }


def _compact(summary: dict) -> dict:
    """A variant's summary without the per-step lists (they stay in seed<s>/<variant>/summary.json)."""
    history = summary["history"]
    return {**{k: v for k, v in summary.items() if k != "history"}, "evaluations": history["evaluations"]}


if __name__ == "__main__":
    main(run)
