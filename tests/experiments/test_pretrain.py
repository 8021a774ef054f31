"""The pre-training experiment (`experiments.pretrain`, `python -m experiments.pretrain`) at a tiny size on
real text: every variant trains and streams, the loss drops, the trained models load in experiments.ppl
and transformers, a run killed with SIGKILL resumes to bitwise-equal weights, and bad input is refused
before anything compiles."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppl as ppl_config
from configs import pretrain_sink
from experiments import ppl, pretrain
from streamjax import training
from streamjax.files import corpora, loading, weights
from streamjax.model.transformer import forward

REPO = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.real_assets

TINY_FIELDS = {
    "vocab_size": 512, "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.intermediate_size": 96, "sample_length": 32, "batch_size": 8, "steps": 40,
    "learning_rate": 1e-2, "warmup_steps": 4, "eval_cache": 16, "eval_tokens": 300, "evaluate_every": 20,
    "heldout_samples": 8, "chunk_size": 16, "checkpoint_every": 15, "matmul_repeats": 1, "seeds": "0,1",
}  # fmt: skip


@pytest.fixture(scope="module")
def text_file(austen_text, tmp_path_factory) -> pathlib.Path:
    """The first 300,000 characters of Austen (Pride and Prejudice), as a corpus file."""
    path = tmp_path_factory.mktemp("text") / "austen_start.txt"
    path.write_text(austen_text.read_text()[:300_000])
    return path


def tiny_config(text_file: pathlib.Path, **changes):
    config = pretrain_sink.get_config()
    config.update_from_flattened_dict({"data": str(text_file), **TINY_FIELDS, **changes})
    return config


@pytest.fixture(scope="module")
def finished(text_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    config = tiny_config(text_file)
    return config, workdir, pretrain.run(config, workdir, progress=False)


def test_every_seed_trains_every_variant_and_the_tables_are_written(finished):
    config, workdir, summary = finished
    assert list(summary["seeds"]) == ["0", "1"]
    table = (workdir / "results.md").read_text()
    for seed, variants in summary["seeds"].items():
        assert list(variants) == list(pretrain.VARIANTS)
        for name, variant in variants.items():
            final = variant["final"]
            assert final["step"] == config.steps and variant["seed"] == int(seed)
            assert list(final["ppl"]) == ["0+16", "1+15", "2+14", "4+12"]
            row = f"| {name} | {final['heldout_loss']:.4f} | " + " | ".join(f"{v:.2f}" for v in final["ppl"].values())
            assert row in table.split(f"Seed {seed}:")[1]
            assert [row["step"] for row in variant["evaluations"]] == [0, 20, 40]
            speed = variant["throughput"]  # a tiny model's fraction of the matmul is noise: only its arithmetic
            assert speed["tokens_per_s"] == pytest.approx(speed["tokens_per_step"] / speed["median_step_s"])
            assert speed["matmul_fraction"] == pytest.approx(speed["flops_per_s"] / speed["matmul_flops_per_s"])
            directory = workdir / f"seed{seed}" / name
            assert (directory / "summary.json").is_file() and not (directory / "checkpoints").exists()
    assert (workdir / "loss.png").stat().st_size > 10_000


def test_the_tables_give_the_mean_and_range_over_seeds(finished):
    _, workdir, summary = finished
    table = (workdir / "results.md").read_text()
    seeds = summary["seeds"].values()
    for name, stats in summary["mean"].items():
        losses = [variants[name]["final"]["heldout_loss"] for variants in seeds]
        assert stats["heldout_loss"]["per_seed"] == losses
        assert stats["heldout_loss"]["mean"] == pytest.approx(np.mean(losses), rel=1e-12)
        assert stats["heldout_loss"]["std"] == pytest.approx(np.std(losses, ddof=1), rel=1e-12)
        ppl = [variants[name]["final"]["ppl"]["1+15"] for variants in seeds]
        assert (stats["ppl"]["1+15"]["min"], stats["ppl"]["1+15"]["max"]) == (min(ppl), max(ppl))
        cell = f"{np.mean(losses):.4f} ({min(losses):.4f}..{max(losses):.4f})"
        assert f"| {name} | {cell} | " in table.split("During training")[0]
    at_20 = {name: [variants[name]["evaluations"][1]["ppl"] for variants in seeds] for name in pretrain.VARIANTS}
    cells = " | ".join(
        f"{np.mean([p['0+16'] for p in rows]):.1f} / {np.mean([p['4+12'] for p in rows]):.1f}"
        for rows in at_20.values()
    )
    assert f"| 20 | 5,120 | {cells} |" in table  # the budget table: mean window attention / with sinks, per step


def test_real_text_lowers_the_held_out_loss_by_a_stated_margin(finished):
    """40 steps of 8 x 32 tokens: the held-out loss falls from ln(512) = 6.24 (uniform) by more than 0.8 nats"""
    _, _, summary = finished
    for name, variant in summary["seeds"]["0"].items():
        first, last = variant["evaluations"][0]["heldout_loss"], variant["final"]["heldout_loss"]
        assert first == pytest.approx(np.log(512), abs=0.05), name
        assert last < first - 0.8, (name, first, last)


def test_the_variants_differ_only_in_what_they_claim(finished):
    config, workdir, _ = finished
    loaded = {name: loading.load_model(str(workdir / "seed0" / name / "model")) for name in pretrain.VARIANTS}
    softmax = {name: model_config.softmax for name, (model_config, _, _) in loaded.items()}
    assert softmax == {
        "vanilla": "standard",
        "sink_token": "standard",
        "zero_sink": "zero_sink",
        "sink_logit": "sink_logit",
    }
    sink_logits = np.stack([np.asarray(layer["sink_logit"]) for layer in loaded["sink_logit"][1]["layers"]])
    assert sink_logits.shape == (2, 4) and np.all(sink_logits != 0)  # trained away from their init of 0
    sink = loaded["sink_token"][2].convert_tokens_to_ids(pretrain.SINK_TOKEN)
    assert loaded["sink_token"][2]("It is a truth").input_ids[0] == sink
    assert sink not in loaded["vanilla"][2]("It is a truth").input_ids


def test_a_trained_model_streams_through_experiments_ppl_with_the_same_numbers(finished, tmp_path):
    config, workdir, summary = finished
    _, heldout = pretrain.split_text(corpora.load_text(config.data), config.heldout_fraction)
    heldout_file = tmp_path / "heldout.txt"
    heldout_file.write_text(heldout)
    ppl_run = ppl_config.get_config()
    ppl_run.update(
        model=str(workdir / "seed0" / "vanilla" / "model"), data=str(heldout_file), method="streaming", num_sinks=2,
        window=14, num_tokens=config.eval_tokens, chunk_size=config.chunk_size, checkpoint_every=0,
    )  # fmt: skip
    result = ppl.run(ppl_run, tmp_path / "ppl", progress=False)
    want = summary["seeds"]["0"]["vanilla"]["final"]["ppl"]["2+14"]
    assert result["runs"][0]["ppl"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("variant", ["vanilla", "sink_token"])
def test_plain_llama_variants_load_in_transformers_with_the_same_logits(finished, variant):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, workdir, _ = finished
    directory = workdir / "seed0" / variant / "model"
    config, params, tokenizer = loading.load_model(str(directory))
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = hf_tokenizer("It is a truth universally acknowledged, that a single man").input_ids
    assert ids == tokenizer("It is a truth universally acknowledged, that a single man").input_ids
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.as_tensor([ids])).logits.numpy()
    got = np.asarray(forward(params, None, np.asarray([ids]), config).logits)
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_transformers_refuses_a_sink_softmax_model_it_would_compute_wrongly(finished):
    from transformers import AutoConfig

    _, workdir, _ = finished
    hf = weights.read_hf_config(workdir / "seed0" / "zero_sink" / "model")
    assert hf["model_type"] == "llama_attention_sink" and hf["softmax"] == "zero_sink"
    with pytest.raises((ValueError, KeyError)):
        AutoConfig.from_pretrained(workdir / "seed0" / "zero_sink" / "model")


# --------------------------------------------------------------------------------------------------
# SIGKILL at any moment, then the same command again: bitwise the same trained model.

KILL_MOMENTS = {"mid_training": "step:20", "inside_a_save": "save:30", "before_export": "export"}


def _child(moment: str, overrides: dict, case: pathlib.Path) -> subprocess.Popen:
    command = [
        sys.executable,
        str(REPO / "tests" / "support" / "killed_pretrain.py"),
        json.dumps(overrides),
        str(case / "w"),
    ]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
    )
    log = open(case / "log", "w")  # noqa: SIM115  (the child writes it while it lives)
    return subprocess.Popen([*command, moment, str(case / "ready")], cwd=REPO, env=env, stdout=log, stderr=log)


@pytest.mark.parametrize("when", list(KILL_MOMENTS))
def test_a_run_killed_at_any_moment_resumes_to_bitwise_equal_weights(finished, text_file, tmp_path, when):
    config, workdir, _ = finished
    overrides = {"data": str(text_file), **TINY_FIELDS, "variants": "vanilla", "seeds": "0"}
    child = _child(KILL_MOMENTS[when], overrides, tmp_path)
    deadline = time.monotonic() + 300
    while not (tmp_path / "ready").exists():
        assert child.poll() is None, f"the run ended before {when}: {(tmp_path / 'log').read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the run never reached the moment"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    resumed = pretrain.run(tiny_config(text_file, variants="vanilla", seeds="0"), tmp_path / "w", progress=False)
    history = json.loads((tmp_path / "w" / "seed0" / "vanilla" / "summary.json").read_text())["history"]
    assert history["starts"] == {"mid_training": [0, 15], "inside_a_save": [0, 15], "before_export": [0, 30]}[when]
    want = weights.read_safetensors(workdir / "seed0" / "vanilla" / "model" / "model.safetensors")
    got = weights.read_safetensors(tmp_path / "w" / "seed0" / "vanilla" / "model" / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[name], want[name]) for name in want)
    assert resumed["seeds"]["0"]["vanilla"]["final"] == finished[2]["seeds"]["0"]["vanilla"]["final"]


def test_sigterm_while_training_saves_exits_143_and_the_same_command_resumes_bitwise(finished, text_file, tmp_path):
    """SIGTERM to a training process once its 20th step has started (it trains on: the signal lands in a step, an
    evaluation or between them): it saves the state after the step it is in, exits 143 saying so, and the same
    run resumes from there to the uninterrupted run's losses, evaluations and weights, bit for bit."""
    _, workdir, _ = finished
    overrides = {"data": str(text_file), **TINY_FIELDS, "variants": "vanilla", "seeds": "0"}
    child = _child("running:20", overrides, tmp_path)
    deadline = time.monotonic() + 300
    while not (tmp_path / "ready").exists():
        assert child.poll() is None, f"the run ended before step 20: {(tmp_path / 'log').read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the run never reached step 20"
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=300) == 128 + signal.SIGTERM
    log = (tmp_path / "log").read_text()
    stopped = re.search(
        r"stopped by SIGTERM: seed 0 vanilla saved after step (\d+) of 40 in (\S+); run the same command", log
    )
    assert stopped, log[-2000:]
    saved = int(stopped[1])
    assert 20 <= saved < 40 and stopped[2] == str((tmp_path / "w").resolve() / "seed0" / "vanilla" / "checkpoints")
    resumed = pretrain.run(tiny_config(text_file, variants="vanilla", seeds="0"), tmp_path / "w", progress=False)
    history = json.loads((tmp_path / "w" / "seed0" / "vanilla" / "summary.json").read_text())["history"]
    uninterrupted = json.loads((workdir / "seed0" / "vanilla" / "summary.json").read_text())["history"]
    assert history["starts"] == [0, saved]
    for name in ("loss", "grad_norm", "learning_rate", "evaluations"):
        assert history[name] == uninterrupted[name], name
    want = weights.read_safetensors(workdir / "seed0" / "vanilla" / "model" / "model.safetensors")
    got = weights.read_safetensors(tmp_path / "w" / "seed0" / "vanilla" / "model" / "model.safetensors")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[name], want[name]) for name in want)
    assert resumed["seeds"]["0"]["vanilla"]["final"] == finished[2]["seeds"]["0"]["vanilla"]["final"]


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error before anything compiles.


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variants": "vanilla,sink"}, "unknown variant 'sink'"),
        ({"variants": "vanilla,vanilla"}, "list a variant twice"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"batch_size": 0}, "batch_size must be > 0"),
        ({"eval_sinks": "0,16"}, "eval_sinks '0,16' must name sink counts in"),
        ({"heldout_fraction": 0.001}, "the held-out text has"),
        ({"mesh": "data=2"}, "does not fit this machine"),
        ({"model.num_heads": 5}, "not a multiple of num_heads"),
        ({"seeds": "0,0"}, "must name one or more distinct integers"),
        ({"seeds": "0,x"}, "seeds must be comma-separated integers"),
        ({"distributed": "num_processes=2"}, "distributed='num_processes=2' lacks coordinator, process_id"),
    ],
)
def test_bad_input_is_refused_before_compiling(text_file, tmp_path, monkeypatch, changes, message):
    monkeypatch.setattr(training, "make_train_step", _never)
    monkeypatch.setattr(training, "init_state", _never)
    with pytest.raises(ValueError, match=message):
        pretrain.run(tiny_config(text_file, **changes), tmp_path / "w", progress=False)
    assert not list((tmp_path / "w").glob("*/checkpoints"))


def test_a_sample_longer_than_the_positions_is_refused_and_the_sink_token_has_one_more(text_file):
    config = tiny_config(text_file)
    model = pretrain.model_config(config, "vanilla")
    with pytest.raises(ValueError, match="beyond the model's 32 positions"):
        training.check_train_config(training.TrainConfig(sample_length=33), model, 10_000, None)
    sink_model = pretrain.model_config(config, "sink_token")
    assert sink_model.max_position_embeddings == 33
    training.check_train_config(pretrain.train_config(config, 1, 0), sink_model, 10_000, None)
    with pytest.raises(ValueError, match="samples of 33 positions"):
        training.check_train_config(pretrain.train_config(config, 1, 0), model, 10_000, None)


def test_a_workdir_of_another_config_is_refused(finished, text_file):
    _, workdir, _ = finished
    with pytest.raises(ValueError, match=r"different config \(steps: 40 in the workdir, 41 now\)"):
        pretrain.run(tiny_config(text_file, steps=41), workdir, progress=False)


def _never(*args, **kwargs):
    raise AssertionError("compiled before the input was checked")


def test_the_tokenizer_is_trained_deterministically_on_the_training_text_only(text_file):
    train_text, heldout = pretrain.split_text(text_file.read_text(), 0.05)
    assert heldout.startswith("\n\n") and train_text + heldout == text_file.read_text()
    first, second = (pretrain.train_tokenizer(train_text, 512) for _ in range(2))
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first.convert_tokens_to_ids(pretrain.SINK_TOKEN) == 1
    ids = pretrain.tokenize(first, heldout)
    assert first.decode(ids.tolist()) == heldout
    assert jnp.asarray(ids).dtype == jnp.int32 and jax.device_get(ids).max() < 512


def test_the_paper_scale_config_is_a_160m_model_with_the_papers_caches():
    from configs import pretrain_sink_160m
    from streamjax.model import families
    from streamjax.model.params import is_spec

    config = pretrain_sink_160m.get_config()
    assert pretrain.check_config(config) == list(pretrain.VARIANTS)
    model = pretrain.model_config(config, "vanilla")
    count = sum(int(np.prod(spec.shape)) for spec in jax.tree.leaves(families.param_specs(model), is_leaf=is_spec))
    assert 155e6 < count < 165e6
    assert (model.max_position_embeddings, config.eval_cache, config.eval_sinks) == (2048, 1024, "0,1,2,4")


def test_bfloat16_training_runs_and_saves_a_float32_model(text_file, tmp_path):
    config = tiny_config(
        text_file, dtype="bfloat16", variants="sink_logit", seeds="0", steps=4, warmup_steps=1, evaluate_every=0
    )
    summary = pretrain.run(config, tmp_path, progress=False)
    assert np.isfinite(summary["seeds"]["0"]["sink_logit"]["final"]["heldout_loss"])
    model_config, params, _ = loading.load_model(str(tmp_path / "seed0" / "sink_logit" / "model"))
    assert model_config.softmax == "sink_logit" and params["embed"].dtype == jnp.float32


def test_a_field_added_later_leaves_the_fingerprint_at_its_default(text_file):
    config = tiny_config(text_file)
    saved_before_dtype = {key: value for key, value in pretrain.fingerprint(config).items() if key != "dtype"}
    assert pretrain.fingerprint(saved_before_dtype) == pretrain.fingerprint(config)
    assert pretrain.fingerprint(tiny_config(text_file, dtype="bfloat16"))["dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------------------
# A controlled comparison: the variants start alike and read the same text.


def _initial_states(config, seed: int) -> dict[str, training.TrainState]:
    return {
        name: training.init_state(
            pretrain.model_config(config, name), pretrain.train_config(config, 1 if sink else None, seed)
        )
        for name, (sink, _) in pretrain.VARIANTS.items()
    }


def test_at_step_0_every_shared_param_is_bitwise_equal_across_the_variants(text_file):
    config = tiny_config(text_file)
    for seed in (0, 1):
        states = _initial_states(config, seed)
        vanilla = states["vanilla"].params
        for name, state in states.items():
            params = jax.tree.map(np.asarray, state.params)
            sink_logits = [layer.pop("sink_logit") for layer in params["layers"] if "sink_logit" in layer]
            assert all(np.array_equal(logits, np.zeros(4)) for logits in sink_logits), name
            assert jax.tree.structure(params) == jax.tree.structure(vanilla), name
            assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, vanilla))), (seed, name)
            np.testing.assert_array_equal(state.sampler_key, states["vanilla"].sampler_key)
    other = _initial_states(config, 1)["vanilla"].params
    assert not np.array_equal(
        other["layers"][0]["qkv"], _initial_states(config, 0)["vanilla"].params["layers"][0]["qkv"]
    )


def test_at_step_0_zero_sink_and_sink_logit_compute_bitwise_the_same(finished, text_file):
    config, _, summary = finished
    states = _initial_states(config, 0)
    windows = jnp.asarray((np.arange(4 * 33) * 131 % 500).reshape(4, 33), jnp.int32)
    inputs, targets = training.samples_to_batch(windows, None)
    losses = {
        name: training.loss(states[name].params, inputs, targets, pretrain.model_config(config, name))
        for name in ("zero_sink", "sink_logit")
    }
    assert np.asarray(losses["zero_sink"]).tobytes() == np.asarray(losses["sink_logit"]).tobytes()
    for variants in summary["seeds"].values():  # the same held-out loss and streaming perplexities at step 0
        assert variants["zero_sink"]["evaluations"][0] == variants["sink_logit"]["evaluations"][0]
        assert variants["zero_sink"]["evaluations"][1] != variants["sink_logit"]["evaluations"][1]


def test_every_variant_reads_the_same_windows_and_is_scored_on_the_same_targets(finished):
    config, workdir, _ = finished
    corpus = pretrain.prepare_corpus(config, workdir)
    tokens = jnp.asarray(corpus.train)
    plain = pretrain.train_config(config, None, 0)
    batches = {}
    for name, (sink, _) in pretrain.VARIANTS.items():
        tc = pretrain.train_config(config, corpus.sink_token if sink else None, 0)
        key = jax.random.split(training.init_state(pretrain.model_config(config, name), tc).sampler_key)[1]
        batches[name] = tuple(map(np.asarray, training.sample_batch(tokens, key, tc)))  # step 1's batch
        heldout = training.heldout_windows(corpus.heldout, tc, config.heldout_samples)
        np.testing.assert_array_equal(heldout, training.heldout_windows(corpus.heldout, plain, config.heldout_samples))
    inputs, targets = batches["vanilla"]
    for sink_inputs, sink_targets in batches.values():
        np.testing.assert_array_equal(sink_targets, targets)
        np.testing.assert_array_equal(sink_inputs[:, -inputs.shape[1] :], inputs)
    np.testing.assert_array_equal(batches["sink_token"][0][:, 0], corpus.sink_token)
