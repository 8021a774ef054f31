"""Training on the model's own forward pass: next-token loss, AdamW, data parallelism, resumable runs.

Letters: B samples per batch, L tokens per sample, V vocab.

One jitted step (`make_train_step`) does all of a step on the devices:
1. the sampler draws B sample starts from the training tokens with the state's key (split every step),
   so the data a step sees is a function of (seed, step) and a resumed run draws what it would have;
2. the loss is the mean NLL of the next token through `model.apply(params, None, inputs, config,
   targets=...)`, the forward pass that streaming evaluation and generation use;
3. `jax.value_and_grad` gives the gradients, clipped to a global norm, then AdamW with a linear warmup
   and a cosine decay (optax). The state's params are float32 master weights, which the optimizer
   updates; a bfloat16 run casts them to bfloat16 inside the step for the forward and backward pass
   only (the gradients flow back through the cast in float32), so updates smaller than bfloat16's
   spacing still accumulate.

With a mesh, params (and their optimizer state) lie on the shards `streamjax.model.sharding` gives them and
each batch is split over the "data" axis; XLA's GSPMD adds the gradient all-reduce. A mesh may span several
processes (`streamjax.runs.distributed`): every process holds the whole training text and the sampler's key
and runs the same step, in which its devices compute their shards of the global batch, so the samples and
the numbers do not depend on the process count (but for the order in which the all-reduce adds).

Every sample is a window of L + 1 text tokens at a sampled start; its targets are the window's last L.
A learnable sink token (the paper's Table 3) is data, not attention: with `sink_token` set, the inputs
are that token followed by the window's first L tokens (L + 1 positions), and the targets are the same
L tokens, so a run with and without the sink token reads the same windows and predicts the same tokens
from the same text (the sink token's own prediction of the window's first token is not scored).
The sink variants of attention itself are `ModelConfig.softmax`.

`train` runs steps with a progress bar and orbax checkpoints of the whole `TrainState` (params,
optimizer state, step and sampler key: one pytree) plus the loss history, verified on restore
(`streamjax.runs.checkpoints`); a run killed at any moment and rerun ends with bitwise the same params.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from streamjax.model import families, sharding
from streamjax.model.config import ModelConfig
from streamjax.model.params import init_params
from streamjax.model.transformer import apply
from streamjax.runs import checkpoints, log
from streamjax.runs.finite import NonFiniteError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (static, hashable): batch and sample shape, schedule, optimizer, sink token, seed.

    The learning rate rises linearly from 0 over `warmup_steps`, then follows a cosine from
    `learning_rate` down to `learning_rate * final_learning_rate_ratio` at `steps`.
    """

    batch_size: int = 16
    sample_length: int = 256
    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    sink_token: int | None = None
    seed: int = 0

    @property
    def text_length(self) -> int:
        """Text tokens one sample reads: L inputs and the token after them (with or without a sink token)."""
        return self.sample_length + 1

    @property
    def input_length(self) -> int:
        """Positions one sample fills: its L text inputs, after the sink token if there is one."""
        return self.sample_length + (1 if self.sink_token is not None else 0)


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. params: the model's; opt_state: optax's (float32); step: int32 [];
    sampler_key: uint32 [2], split once per step for the batch's sample starts."""

    params: dict
    opt_state: Any
    step: jax.Array
    sampler_key: jax.Array


def check_train_config(train_config: TrainConfig, config: ModelConfig, num_tokens: int, mesh: Mesh | None) -> None:
    """Raise ValueError for a training setup that cannot run, before anything is compiled."""
    tc = train_config
    positive = {"batch_size": tc.batch_size, "steps": tc.steps, "learning_rate": tc.learning_rate}
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if tc.sample_length < 2:
        raise ValueError(f"sample_length must be >= 2, got {tc.sample_length}")
    if tc.input_length > config.max_position_embeddings:
        raise ValueError(
            f"samples of {tc.input_length} positions (sample_length {tc.sample_length}"
            f"{' and the sink token' if tc.sink_token is not None else ''}) are beyond the model's "
            f"{config.max_position_embeddings} positions (max_position_embeddings): shorten the samples or "
            "give the model more positions"
        )
    if not 0 <= tc.warmup_steps < tc.steps:
        raise ValueError(
            f"warmup_steps must lie in [0, steps={tc.steps}) (the cosine needs a step), got {tc.warmup_steps}"
        )
    if not 0 <= tc.final_learning_rate_ratio <= 1:
        raise ValueError(f"final_learning_rate_ratio must lie in [0, 1], got {tc.final_learning_rate_ratio}")
    if tc.clip_norm <= 0 or tc.weight_decay < 0:
        raise ValueError(f"clip_norm must be > 0 and weight_decay >= 0, got {tc.clip_norm} and {tc.weight_decay}")
    if tc.sink_token is not None and not 0 <= tc.sink_token < config.vocab_size:
        raise ValueError(f"sink_token {tc.sink_token} is outside the vocabulary [0, {config.vocab_size})")
    if num_tokens < tc.text_length:
        raise ValueError(f"the training text has {num_tokens} tokens, fewer than one sample ({tc.text_length})")
    data = 1 if mesh is None else mesh.shape["data"]
    if tc.batch_size % data:
        raise ValueError(f"batch_size {tc.batch_size} is not a multiple of the mesh's data axis ({data} devices)")


def learning_rate_schedule(train_config: TrainConfig) -> optax.Schedule:
    tc = train_config
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, tc.warmup_steps, tc.steps, tc.learning_rate * tc.final_learning_rate_ratio
    )


def make_optimizer(train_config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then AdamW on `learning_rate_schedule` (decay on every param)."""
    tc = train_config
    adamw = optax.adamw(learning_rate_schedule(tc), tc.beta1, tc.beta2, weight_decay=tc.weight_decay)
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw)


def init_state(
    config: ModelConfig, train_config: TrainConfig, params: dict | None = None, mesh: Mesh | None = None
) -> TrainState:
    """The state before step 0: float32 master params (`params`, or random from `train_config.seed`), a
    float32 optimizer state, step 0 and the sampler's key; on the shards of `mesh` if given."""
    key, sampler_key = jax.random.split(jax.random.PRNGKey(train_config.seed))
    specs = families.param_specs(config)
    step, replicated = jnp.zeros((), jnp.int32), None
    if mesh is None:
        params = init_params(specs, key) if params is None else _float32(params)
    elif params is None:  # each device draws its own shards: no param is ever whole on a host or a device
        draw = jax.jit(functools.partial(init_params, specs), out_shardings=sharding.param_shardings(specs, mesh))
        params = draw(key)
    else:
        params = sharding.shard_params(_float32(params), specs, mesh)
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        step, sampler_key = jax.device_put((step, sampler_key), replicated)
    opt_state = jax.jit(make_optimizer(train_config).init)(params)
    if mesh is not None:  # counters made from no input land on one device: replicate them over the mesh
        on_mesh = lambda leaf: leaf if len(leaf.sharding.device_set) == mesh.size else jax.device_put(leaf, replicated)  # noqa: E731
        opt_state = jax.tree.map(on_mesh, opt_state)
    return TrainState(params, opt_state, step, sampler_key)


def _float32(tree):
    return _cast(tree, jnp.float32)


def _cast(tree, dtype):
    return jax.tree.map(lambda leaf: leaf.astype(dtype), tree)


def sample_batch(tokens: jax.Array, key: jax.Array, train_config: TrainConfig) -> tuple[jax.Array, jax.Array]:
    """(inputs [B, input_length], targets [B, L]) of B windows of `tokens` [N] (`samples_to_batch`) at the
    starts `sample_starts` draws."""
    tc = train_config
    windows = tokens[sample_starts(key, tokens.shape[0], tc)[:, None] + jnp.arange(tc.text_length)]
    return samples_to_batch(windows, tc.sink_token)


def sample_starts(key: jax.Array, num_tokens: int, train_config: TrainConfig) -> jax.Array:
    """int32 [B]: the first text token of each window, uniform over the `num_tokens` - text_length + 1 starts
    (the same for a run with and without a sink token)."""
    return jax.random.randint(key, (train_config.batch_size,), 0, num_tokens - train_config.text_length + 1)


def samples_to_batch(windows: jax.Array, sink_token: int | None) -> tuple[jax.Array, jax.Array]:
    """(inputs, targets) of text windows [B, L + 1]: inputs the first L tokens (after the sink token if
    given: [B, L + 1]), targets [B, L] the last L tokens either way."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if sink_token is None:
        return inputs, targets
    sinks = jnp.full((windows.shape[0], 1), sink_token, windows.dtype)
    return jnp.concatenate([sinks, inputs], axis=1), targets


def loss(params: dict, inputs: jax.Array, targets: jax.Array, config: ModelConfig) -> jax.Array:
    """Mean next-token NLL (float32 []) of `targets` [B, L], the tokens after the last L of `inputs` [B, P + L],
    causal from position 0; the first P positions (e.g. a sink token) are context whose predictions are not
    scored."""
    context = inputs.shape[1] - targets.shape[1]
    padded = jnp.concatenate([inputs[:, 1 : context + 1], targets], axis=1)  # position p predicts padded[:, p]
    return jnp.mean(apply(params, None, inputs, config, targets=padded, logits="none").nll[:, context:])


def _train_step(state: TrainState, tokens: jax.Array, *, config, train_config, batch_sharding, compute_dtype):
    sampler_key, key = jax.random.split(state.sampler_key)
    inputs, targets = sample_batch(tokens, key, train_config)
    if batch_sharding is not None:
        inputs, targets = jax.lax.with_sharding_constraint((inputs, targets), batch_sharding)
    compute_loss = lambda master: loss(_cast(master, compute_dtype), inputs, targets, config)  # noqa: E731
    value, grads = jax.value_and_grad(compute_loss)(state.params)
    updates, opt_state = make_optimizer(train_config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": value,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": learning_rate_schedule(train_config)(state.step),
    }
    return TrainState(params, opt_state, state.step + 1, sampler_key), metrics


def make_train_step(
    config: ModelConfig,
    train_config: TrainConfig,
    state: TrainState,
    mesh: Mesh | None = None,
    compute_dtype=jnp.float32,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    """The jitted `step(state, tokens) -> (state, metrics)`; `tokens` int32 [N] are the training text.

    The forward and backward pass read the float32 master params cast to `compute_dtype` (e.g. bfloat16);
    the optimizer updates the float32 masters. The state is donated, and comes out on the shards it went
    in on (those of `state`), so a restored checkpoint runs the very same program.
    """
    batch = None if mesh is None else sharding.batch_sharding(mesh, train_config.batch_size)
    step = functools.partial(
        _train_step, config=config, train_config=train_config, batch_sharding=batch, compute_dtype=compute_dtype
    )
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step, in_shardings=(state_shardings, replicated), out_shardings=(state_shardings, replicated), donate_argnums=0
    )


def place_tokens(tokens: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """The training text int32 [N] on the default device, or replicated over `mesh`: in a run of several
    processes, each gives its own copy (they must be equal: the experiment checks their digests), so that
    no process gathers the others' (`jax.device_put` would, to compare them)."""
    if mesh is None:
        return jnp.asarray(tokens, jnp.int32)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), np.asarray(tokens, np.int32))


def heldout_windows(tokens: np.ndarray, train_config: TrainConfig, max_samples: int) -> np.ndarray:
    """Consecutive, non-overlapping text windows [M, text_length] of held-out `tokens`, at most `max_samples`
    (the same windows, so the same targets, with and without a sink token)."""
    count = min(tokens.shape[0] // train_config.text_length, max_samples)
    if count < 1:
        raise ValueError(
            f"the held-out text has {tokens.shape[0]} tokens, fewer than one sample ({train_config.text_length})"
        )
    return tokens[: count * train_config.text_length].reshape(count, train_config.text_length)


@functools.partial(jax.jit, static_argnames=("config", "sink_token"))
def _windows_loss(params, windows, config, sink_token):
    return loss(params, *samples_to_batch(windows, sink_token), config)


def heldout_loss(params: dict, config: ModelConfig, windows: np.ndarray, train_config: TrainConfig) -> float:
    """Mean NLL over held-out `windows` [M, text_length] (`heldout_windows`), fed as training samples are,
    `batch_size` at a time (the last batch may be smaller)."""
    totals = []
    for start in range(0, windows.shape[0], train_config.batch_size):
        batch = jnp.asarray(windows[start : start + train_config.batch_size])
        totals.append(float(_windows_loss(params, batch, config, train_config.sink_token)) * batch.shape[0])
    return sum(totals) / windows.shape[0]


def state_tree(state: TrainState) -> dict:
    """The state as nested dicts of arrays (what a checkpoint holds)."""
    return flax.serialization.to_state_dict(state)


def train(
    config: ModelConfig,
    train_config: TrainConfig,
    tokens: np.ndarray,
    directory: pathlib.Path,
    *,
    meta: dict,
    params: dict | None = None,
    dtype=None,
    mesh: Mesh | None = None,
    checkpoint_every: int = 100,
    evaluate: Callable[[dict], dict] | None = None,
    evaluate_every: int = 0,
    progress: bool = True,
    stop=None,
    description: str = "train",
) -> tuple[TrainState, dict]:
    """Train `train_config.steps` steps on `tokens` [N], resuming from `directory`'s checkpoints, from
    `params` or random params (`init_state`: float32 masters), computing in `dtype` (default float32).

    `meta` (JSON) identifies the job: a checkpoint saved with other `meta` is refused. `evaluate(params)`
    (a dict of numbers), if given, runs before the first step, every `evaluate_every` steps and after the
    last. Returns the final state and the history: per step `loss`, `learning_rate`, `grad_norm` and
    compute `seconds`; `evaluations` [{step, **evaluate(params)}]; `starts` (the step of each start).
    A `stop` (`experiment.StopRequests`) that caught a signal saves the state after the step and stops.
    """
    check_train_config(train_config, config, tokens.shape[0], mesh)
    state = init_state(config, train_config, params, mesh)
    history = {"loss": [], "learning_rate": [], "grad_norm": [], "seconds": [], "evaluations": [], "starts": []}
    state, history = _restore(directory, state, history, meta)
    history["starts"].append(int(state.step))
    step_fn = make_train_step(config, train_config, state, mesh, jnp.float32 if dtype is None else dtype)
    device_tokens = place_tokens(tokens, mesh)
    manager = checkpoints.manager(directory)
    bar = tqdm(total=train_config.steps, initial=int(state.step), unit="step", desc=description, disable=not progress)
    sample_tokens = train_config.batch_size * train_config.sample_length
    if evaluate is not None and int(state.step) == 0 and not history["evaluations"]:
        history["evaluations"].append({"step": 0, **evaluate(state.params)})
    while int(state.step) < train_config.steps:
        clock = time.perf_counter()
        state, metrics = step_fn(state, device_tokens)
        metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - clock
        _append(history, metrics, seconds)
        step = int(state.step)
        bar.set_postfix(
            loss=f"{metrics['loss']:.3f}", lr=f"{metrics['learning_rate']:.2e}", tok_s=f"{sample_tokens / seconds:.0f}"
        )
        bar.update(1)
        if evaluate is not None and (step == train_config.steps or (evaluate_every and step % evaluate_every == 0)):
            history["evaluations"].append({"step": step, **evaluate(state.params)})
        stopping = stop is not None and stop.requested()
        if (step % checkpoint_every == 0 or stopping) and step < train_config.steps:
            checkpoints.save(
                manager, step, state_tree(state), dict(meta, history=history), f"the state after step {step}"
            )
            if stop is not None:
                stop.check(f"{description} saved after step {step} of {train_config.steps} in {directory}")
    bar.close()
    manager.close()
    return state, history


def _append(history: dict, metrics: dict, seconds: float) -> None:
    for name in ("loss", "learning_rate", "grad_norm"):
        value = float(metrics[name])
        if not math.isfinite(value):
            raise NonFiniteError(f"training {name} became {value} at step {len(history['loss']) + 1}")
        history[name].append(value)
    history["seconds"].append(seconds)


def _restore(directory: pathlib.Path, state: TrainState, history: dict, meta: dict) -> tuple[TrainState, dict]:
    """The latest sound checkpoint of `directory` onto the shards of `state`, or `state` itself."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_tree(state))

    def check(saved: dict, path: pathlib.Path) -> None:
        for key, value in meta.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"checkpoint {path} was saved with a different {key} ({saved.get(key)!r} != {value!r}); "
                    "delete the workdir or use another"
                )

    restored = checkpoints.restore_latest(directory, abstract, check)
    if restored is None:
        return state, history
    log.log("training", f"resuming {directory} from step {restored.step}")
    return flax.serialization.from_state_dict(state, restored.tree), restored.meta["history"]
