"""Training (`streamjax.training`): loss and gradients against transformers, the sampler, the optimizer's
state, resuming, data parallelism on 8 CPU devices, and the checks made before anything compiles."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamjax import training
from streamjax.files.weights import convert_tensors
from streamjax.model import families
from streamjax.model.config import ModelConfig
from streamjax.model.transformer import apply
from support.models import cpu_devices_env, random_hf_llama, to_streamjax

TINY = ModelConfig(
    family="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=64, norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=64,
)  # fmt: skip
TOKENS = (np.arange(3000) * 7919 % 97).astype(np.int32)


def _torch_loss_and_grads(model, windows: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    import torch

    model.zero_grad()
    inputs, targets = torch.as_tensor(windows[:, :-1]), torch.as_tensor(windows[:, 1:])
    logits = model(inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())
    loss.backward()
    return float(loss), {name: p.grad.numpy() for name, p in model.named_parameters()}


# Measured (float32, CPU): loss relative difference <= 2.1e-7 at both init scales; gradients' largest
# difference relative to their largest magnitude <= 5.9e-7 at std 0.05 (attention within 2.2e-4 of uniform)
# and <= 1.3e-6 at std 0.4 (attention up to 0.85 away from uniform). Tolerances are about 3x those.
PARITY_TOLERANCES = {0.05: 2e-6, 0.4: 4e-6}  # init std: gradient tolerance
LOSS_TOLERANCE = 6e-7
BF16_MEAN_TOLERANCE, BF16_MAX_TOLERANCE = 6e-4, 1.2e-2  # test_a_bfloat16_run_tracks_the_float32_runs_loss


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("std", list(PARITY_TOLERANCES))
def test_loss_and_gradients_equal_transformers(tied, std):
    import torch

    model = random_hf_llama(seed=3, std=std, tie_word_embeddings=tied, attn_implementation="eager").float()
    model.train(False)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    config, params = to_streamjax(model)
    windows = np.random.default_rng(0).integers(0, config.vocab_size, (3, 17)).astype(np.int64)
    with torch.no_grad():
        attention = model(torch.as_tensor(windows[:, :-1]), output_attentions=True).attentions[0].numpy()
    uniform = np.tril(np.ones((16, 16))) / np.arange(1, 17)[:, None]
    assert (np.max(np.abs(attention - uniform)) > 0.5) == (std == 0.4)  # the larger init attends non-uniformly
    torch_loss, torch_grads = _torch_loss_and_grads(model, windows)
    loss, grads = jax.value_and_grad(training.loss)(
        params, jnp.asarray(windows[:, :-1], jnp.int32), jnp.asarray(windows[:, 1:], jnp.int32), config
    )
    assert abs(float(loss) - torch_loss) <= LOSS_TOLERANCE * abs(torch_loss)
    expected = convert_tensors(torch_grads, config)  # the same layout change as the weights: a permutation
    for path, want in jax.tree_util.tree_leaves_with_path(expected):
        got = np.asarray(_at(grads, path))
        scale = np.max(np.abs(want))
        assert scale > 0, path
        assert np.max(np.abs(got - want)) <= PARITY_TOLERANCES[std] * scale, (
            jax.tree_util.keystr(path),
            np.max(np.abs(got - want)),
            scale,
        )


def _at(tree, path):
    for key in path:
        tree = tree[key.key if hasattr(key, "key") else key.idx]
    return tree


def test_sampler_draws_the_same_windows_with_and_without_the_sink_token_before_them():
    tc = training.TrainConfig(batch_size=5, sample_length=9, steps=1, warmup_steps=0)
    tokens = jnp.arange(100, dtype=jnp.int32)  # token i is at position i: a window's values are its positions
    inputs, targets = map(np.asarray, training.sample_batch(tokens, jax.random.PRNGKey(1), tc))
    starts = np.asarray(training.sample_starts(jax.random.PRNGKey(1), 100, tc))
    np.testing.assert_array_equal(inputs, starts[:, None] + np.arange(9))  # 9 consecutive text tokens
    np.testing.assert_array_equal(targets, inputs + 1)
    sink = dataclasses.replace(tc, sink_token=99)
    np.testing.assert_array_equal(training.sample_starts(jax.random.PRNGKey(1), 100, sink), starts)
    sink_inputs, sink_targets = map(np.asarray, training.sample_batch(tokens, jax.random.PRNGKey(1), sink))
    assert sink_inputs.shape == (5, 10) and sink.input_length == 10 and sink.text_length == tc.text_length == 10
    np.testing.assert_array_equal(sink_inputs[:, 0], 99)
    np.testing.assert_array_equal(sink_inputs[:, 1:], inputs)  # the same window after the sink token
    np.testing.assert_array_equal(sink_targets, targets)  # the same predictions scored
    np.testing.assert_array_equal(
        training.init_state(TINY, sink).sampler_key, training.init_state(TINY, tc).sampler_key
    )


def test_the_held_out_windows_and_targets_are_the_same_with_and_without_the_sink_token():
    plain = training.TrainConfig(batch_size=4, sample_length=16, steps=10, warmup_steps=2)
    sink = dataclasses.replace(plain, sink_token=96)
    windows = training.heldout_windows(TOKENS, plain, 5)
    np.testing.assert_array_equal(training.heldout_windows(TOKENS, sink, 5), windows)
    np.testing.assert_array_equal(windows.ravel(), TOKENS[: 5 * 17])
    np.testing.assert_array_equal(
        training.samples_to_batch(windows, 96)[1], training.samples_to_batch(windows, None)[1]
    )


def test_the_sink_tokens_own_prediction_is_not_scored():
    params = training.init_state(TINY, training.TrainConfig(steps=1, warmup_steps=0)).params
    window = jnp.asarray(TOKENS[None, 5:22])
    inputs, targets = training.samples_to_batch(window, 96)
    nll = apply(params, None, inputs, TINY, targets=jnp.concatenate([window[:, :1], targets], 1), logits="none").nll
    assert float(training.loss(params, inputs, targets, TINY)) == pytest.approx(float(jnp.mean(nll[:, 1:])), rel=1e-6)
    assert float(jnp.mean(nll[:, 1:])) != pytest.approx(float(jnp.mean(nll)), rel=1e-4)


def test_schedule_warms_up_then_decays_to_its_floor():
    tc = training.TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, final_learning_rate_ratio=0.1)
    schedule = training.learning_rate_schedule(tc)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(100)) == pytest.approx(1e-4)
    assert 1e-4 < float(schedule(55)) < 1e-3


def test_steps_lower_the_loss(tmp_path):
    tc = training.TrainConfig(batch_size=4, sample_length=16, steps=30, learning_rate=1e-2, warmup_steps=3)
    state, history = training.train(TINY, tc, TOKENS, tmp_path / "f32", meta={}, progress=False)
    assert np.mean(history["loss"][-5:]) < history["loss"][0] - 1.0  # a periodic text is learnt fast


def _run_steps(train_config: training.TrainConfig, compute_dtype, steps: int) -> tuple[training.TrainState, list]:
    state = training.init_state(TINY, train_config)
    step = training.make_train_step(TINY, train_config, state, compute_dtype=compute_dtype)
    tokens, losses = jnp.asarray(TOKENS), []
    for _ in range(steps):
        state, metrics = step(state, tokens)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_bfloat16_training_keeps_float32_master_weights_that_small_updates_move():
    """With a learning rate of 1e-6 every update is ~1e-6, far below bfloat16's spacing (>= 6.1e-5 for |w| > 0.01,
    most of an init of std 0.02): rounded back to bfloat16 each step, as before, those params never moved."""
    tc = training.TrainConfig(batch_size=4, sample_length=16, steps=5, learning_rate=1e-6, warmup_steps=0)
    initial = training.init_state(TINY, tc).params
    state, _ = _run_steps(tc, jnp.bfloat16, 5)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
    assert moments and {leaf.dtype for leaf in moments} == {jnp.dtype(jnp.float32)}
    qkv, start = np.asarray(state.params["layers"][0]["qkv"]), np.asarray(initial["layers"][0]["qkv"])
    assert 2e-6 < np.max(np.abs(qkv - start)) < 1e-5  # 5 Adam steps of ~1e-6 each, kept in float32
    large = np.abs(start) > 0.01  # bfloat16's spacing there is >= 6.1e-5: a 1e-6 update rounds back to the old value
    moved = np.abs(qkv - start)[large]
    print(f"qkv entries above 0.01: {large.mean():.2f} of them, median movement {np.median(moved):.2e}")
    assert np.median(moved) > 1e-6  # rounded back to bfloat16 each step (before), every one of them stayed put


def test_a_bfloat16_run_tracks_the_float32_runs_loss():
    """300 steps of TINY on the periodic text. Measured: the mean over steps of |loss bf16 - loss f32| was
    1.8e-4, the largest single step 3.9e-3 (the float32 loss falls from 4.61 to 3.5e-4); tolerances are about 3x
    those."""
    tc = training.TrainConfig(batch_size=4, sample_length=16, steps=300, learning_rate=1e-2, warmup_steps=10)
    _, float32 = _run_steps(tc, jnp.float32, 300)
    _, bfloat16 = _run_steps(tc, jnp.bfloat16, 300)
    difference = np.abs(np.asarray(bfloat16) - np.asarray(float32))
    print(
        f"bf16 vs f32 loss: mean |diff| {difference.mean():.4f}, max {difference.max():.4f}, final f32 {float32[-1]:.4f}"
    )
    assert float32[-1] < float32[0] - 2.0  # it learnt: the comparison is not of two untrained runs
    assert difference.mean() <= BF16_MEAN_TOLERANCE and difference.max() <= BF16_MAX_TOLERANCE


def test_a_run_that_crashed_resumes_to_bitwise_equal_params_and_another_job_is_refused(tmp_path):
    tc = training.TrainConfig(batch_size=4, sample_length=16, steps=9, learning_rate=1e-2, warmup_steps=2)
    whole, _ = training.train(TINY, tc, TOKENS, tmp_path / "whole", meta={"job": 1}, progress=False)

    calls = []

    def crash(params):  # evaluations come before step 1 and after step 6: crash at the second
        calls.append(params)
        if len(calls) == 2:
            raise RuntimeError("crashed after step 6")
        return {}

    with pytest.raises(RuntimeError, match="crashed"):
        training.train(
            TINY, tc, TOKENS, tmp_path / "parts", meta={"job": 1}, checkpoint_every=4, evaluate=crash,
            evaluate_every=6, progress=False,
        )  # fmt: skip
    assert sorted(int(p.name) for p in (tmp_path / "parts").iterdir() if p.name.isdigit()) == [4]
    resumed, history = training.train(TINY, tc, TOKENS, tmp_path / "parts", meta={"job": 1}, progress=False)
    assert history["starts"] == [0, 4] and len(history["loss"]) == 9
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), whole.params, resumed.params)))
    with pytest.raises(ValueError, match="different job"):
        training.train(TINY, tc, TOKENS, tmp_path / "parts", meta={"job": 2}, progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"learning_rate": -1e-3}, "learning_rate must be > 0"),
        ({"sample_length": 65}, "beyond the model's 64 positions"),
        ({"sample_length": 64, "sink_token": 96}, "samples of 65 positions"),
        ({"batch_size": 0}, "batch_size must be > 0"),
        ({"warmup_steps": 20}, "warmup_steps must lie in"),
        ({"sink_token": 97}, "outside the vocabulary"),
    ],
)
def test_bad_training_settings_are_refused_before_compiling(change, message, monkeypatch, tmp_path):
    monkeypatch.setattr(training, "make_train_step", _never)
    monkeypatch.setattr(training, "init_state", _never)
    tc = training.TrainConfig(**{"batch_size": 4, "sample_length": 16, "steps": 10, "warmup_steps": 2, **change})
    with pytest.raises(ValueError, match=message):
        training.train(TINY, tc, TOKENS, tmp_path, meta={}, progress=False)
    assert not tmp_path.joinpath("0").exists()


def test_text_shorter_than_a_sample_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(training, "make_train_step", _never)
    tc = training.TrainConfig(batch_size=4, sample_length=16, steps=10, warmup_steps=2)
    with pytest.raises(ValueError, match="fewer than one sample"):
        training.train(TINY, tc, TOKENS[:16], tmp_path, meta={}, progress=False)
    with pytest.raises(ValueError, match="held-out text has 10 tokens, fewer than one sample"):
        training.heldout_windows(TOKENS[:10], tc, 4)


def _never(*args, **kwargs):
    raise AssertionError("compiled before the settings were checked")


_MESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from test_training import TINY, TOKENS
    from streamjax import training
    from streamjax.model import sharding

    tc = training.TrainConfig(batch_size=8, sample_length=16, steps=4, learning_rate=1e-2, warmup_steps=1)
    results = {}
    for spec in ("", "data=8", "data=4,model=2"):
        mesh = sharding.make_mesh(spec) if spec else None
        state = training.init_state(TINY, tc, mesh=mesh)
        step = training.make_train_step(TINY, tc, state, mesh)
        tokens = jax.numpy.asarray(TOKENS)
        losses = []
        for _ in range(tc.steps):
            state, metrics = step(state, tokens)
            losses.append(float(metrics["loss"]))
        qkv = state.params["layers"][0]["qkv"]
        results[spec or "one"] = {
            "losses": losses,
            "params": [np.asarray(leaf).ravel().tolist() for leaf in jax.tree.leaves(state.params)],
            "qkv_shards": len(qkv.sharding.device_set),
            "qkv_split": qkv.sharding.shard_shape(qkv.shape) != qkv.shape,
        }
    try:
        training.check_train_config(
            training.TrainConfig(batch_size=6, sample_length=16), TINY, 1000, sharding.make_mesh("data=4,model=2")
        )
    except ValueError as error:
        results["error"] = str(error)
    print(json.dumps(results))
    """
)


def test_training_on_8_cpu_devices_matches_one_device():
    done = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT], env=cpu_devices_env(8), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    one = results["one"]
    for spec in ("data=8", "data=4,model=2"):
        np.testing.assert_allclose(results[spec]["losses"], one["losses"], rtol=1e-5)
        for got, want in zip(results[spec]["params"], one["params"]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert results["data=8"]["qkv_shards"] == 8 and not results["data=8"]["qkv_split"]  # replicated over data
    assert results["data=4,model=2"]["qkv_split"]  # kv heads split over model
    assert "batch_size 6 is not a multiple of the mesh's data axis (4 devices)" in results["error"]


def test_param_specs_cover_every_trained_param():
    specs = families.param_specs(TINY)
    state = training.init_state(TINY, training.TrainConfig(batch_size=2, sample_length=8, steps=1, warmup_steps=0))
    assert jax.tree.structure(state.params) == jax.tree.structure(
        jax.tree.map(lambda s: 0, specs, is_leaf=lambda x: hasattr(x, "axes"))
    )
