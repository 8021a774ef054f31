"""Efficiency of streaming (the paper's Figure 10), of the two evaluation routes, and the machine's limits.

`run(config, workdir)` is what `python -m experiments.efficiency` calls; the config fields are
documented in `configs/efficiency.py`. It measures, on the default JAX backend:

- decode: per-token latency and memory against cache size n for
    streaming  the jitted `streamjax.step` (T = 1, cache donated) on a full S + (n - S) sink cache;
    recompute  sliding window with re-computation: a plain causal pass over the last n tokens (the
               new one included) for every token, computing only the last position's logits;
    dense      the step on a cache holding every token so far: the cost of token n + 1 with n cached.
- routes: evaluation throughput (predictions per second) of `perplexity.evaluate` on the token route
  (one token per forward pass in a `lax.scan`) and the chunk route, at S + W = num_sinks + route_window,
  and the two routes' NLL compared over `route_compare_tokens` predictions (past the cache, over
  several chunks).
- generation: `generation.decode_block` (greedy) on a full cache, per token against the bare jitted
  step at batch 1, and tokens per second at batch `generation_batch` against batch 1.
- long_stream: the per-token decode cost early in a stream against far into it, and the memory after
  many tokens against after fewer. The cache is either set to the exact state streaming leaves after
  that many tokens (`filled_cache`: the same bookkeeping, random keys and values, which do not change
  the cost) or really streamed there with the chunk route (`config.long_stream_streamed`).
- peer (optional, `config.transformers_peer`): transformers' own greedy generation of the same model
  file (torch, imported only there), its default cache (a hybrid model's sliding-window layers included),
  per generated token, beside streamjax's generation at batch 1 measured in the same run.
- machine: memory bandwidth (a sum, a donated in-place +1 and a matrix-vector product over
  `bandwidth_bytes`) and matmul throughput (float32 and bfloat16). Each decode row is set against
  the best of those (`bandwidth_fraction`) and against a read-only sum timed just before the row
  (`adjacent_bandwidth_fraction`: the same machine state, which matters on a shared machine); each
  route and recompute row against the matmul throughput of the model's dtype (`matmul_fraction`).

- mesh (only with `config.mesh`, and then alone: the sections above measure one device): one decode step
  and one training step (`streamjax.training`) of the model laid over the mesh, which may span several
  processes (`config.distributed`, `streamjax.runs.distributed`). XLA's collectives in each compiled step
  are listed from its HLO (`streamjax.runs.collectives`: op, shapes and bytes per device, device groups,
  whether a group spans processes); the step is timed alone, then run `mesh_traced_steps` times under
  `jax.profiler`, whose trace gives each collective's seconds per step on this process's devices. Process
  0 writes `workdir/efficiency_mesh.json` and its summary table `workdir/results.md`:
    meta         as below, and processes, local_devices
    mesh         {spec, axes, processes, devices, device_processes (the process of each mesh device, in
                 the order of the collectives' device ids), decode {batch, cache_size, ...}, train {batch,
                 sample_length, ...}: each {timing (the step alone), traced_step_s, collective_s,
                 collective_share (of the traced step), collective_bytes, cross_process_collective_s,
                 cross_process_share, cross_process_bytes, untimed_collectives, unread_groups, collectives
                 [{name, op, shapes, bytes, groups, crosses_processes, seconds_per_step, executions_per_step}],
                 per_process [{process, step_s, traced_step_s, collective_s, cross_process_collective_s}]}}
  Seconds are per device per step (the mean over this process's devices); bytes are the collectives'
  results on one device, per step. A collective's seconds include its wait for the slowest device.

Timings: `warmup` untimed calls, then `repeats` calls each ended by `block_until_ready`; the median
is the figure, min and all times are kept. Figures that are compared (the two routes, the early and
late positions) are timed alternately, so that drift of a shared machine affects both alike.

Memory, two measures, in bytes:
- compiled: XLA's buffer assignment of the compiled function (`Compiled.memory_analysis()`):
  arguments + outputs - donated aliases + temporaries. Deterministic, the same on every backend;
  the memory plot shows it.
- runtime (`sampled_memory`): the most in use during the measurement, sampled in a thread: the
  device's `bytes_in_use` where the backend reports memory stats (GPU, TPU), else the process's
  resident set (CPU); with the use after it and the process-lifetime high for reference.
- minor_page_faults_per_token (decode): the process's minor page faults (`getrusage`) per decode
  step; on CPU, pages of temporary buffers that the operating system maps in again on every step.

Output (`workdir/efficiency.json`; the plots `latency_vs_cache.png`, `memory_vs_cache.png`,
`route_throughput.png`):
    meta         model, dtype, backend, device, versions, config, load averages, wall time, made_by
                 (the command line and commit, also written under every plot)
    machine      bandwidth {reduce, copy, matvec: {bytes, timing, bytes_per_s}, best_bytes_per_s}
                 matmul {float32, bfloat16: {size, flops, timing, flops_per_s}}
    decode       {cache_sizes, num_sinks, methods: {method: [{cache_size, timing, memory {compiled,
                 runtime}, flops_per_token, matmul_fraction; streaming and dense also bytes_per_token,
                 ideal_s, bandwidth_fraction, adjacent_read_bytes_per_s, adjacent_bandwidth_fraction,
                 and memory.minor_page_faults_per_token}]}}
    routes       {num_sinks, window, chunk_size, token and chunk: {num_predictions, first_call_s,
                 timing, tokens_per_s, flops_per_token, flops_per_s, matmul_fraction}, speedup,
                 compared_predictions, max_abs_nll_difference, max_abs_nll_difference_past_cache}
    generation   {num_sinks, window, block_steps, step, batch_1, batch_<n>: {per_step_s, median_s,
                 tokens_per_s}, over_step, batch_speedup, weight_matmuls {batch_1_s, batch_<n>_s,
                 ratio} (every layer's weight matmuls alone at 1 and n rows: what the backend's matrix
                 multiply charges for more rows, the ceiling on batch_speedup)}
    long_stream  {num_sinks, window, state, "<position>": {position, timing, memory}, late_over_early,
                 memory_peak_ratio, generation: {block_steps, "<position>": {per_token_s,
                 phase_peak_bytes}, late_over_early, memory_peak_ratio}} (generation from the stream's
                 state at the early and the late position)
    peer         (only with transformers_peer) {library, transformers_version, torch_version, torch_threads,
                 load_average_before, attn_implementation, cache {type, layers: [{type, tokens}]} (after the
                 last generation), prompt_tokens, new_tokens, rounds, prompt_s, per_token_s (every gap between
                 generated tokens), median_per_token_s, tokens_per_s, streamjax_generation_per_token_s
                 (generation.batch_1), transformers_over_streamjax}
    targets      [{name, value, target, met}]

Byte and FLOP figures (`streamjax.model.costs`) count a hybrid model's layers by type: its sliding layers
read their own ring (the model's w - 1 slots) whatever the cache size of the row, its full-attention
layers the row's S + W.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

import streamjax
from experiments.program import main
from streamjax import training
from streamjax.files import loading
from streamjax.model import costs, families, sharding
from streamjax.model.cache import SinkCache, check_cache_shape, check_sliding_cache, init_cache
from streamjax.model.config import ModelConfig
from streamjax.model.params import init_params
from streamjax.model.transformer import jitted_forward
from streamjax.runs import collectives, distributed, log, machine, plots, provenance, writes
from streamjax.stream import generation, perplexity, sampling, stopping

METHODS = ("streaming", "recompute", "dense")


# ----------------------------------------------------------------------------------------------
# Model and cache states


def build_model(config, mesh: Mesh | None = None) -> tuple[ModelConfig, dict]:
    """(model config, params): `config.model` loaded, or random weights of `config.random_model`; with a `mesh`,
    made on their shards of it (never whole on one device)."""
    dtype = loading.parse_dtype(config.dtype)
    if config.model != "random":
        model_config, params, _ = loading.load_model(config.model, dtype, mesh)
        return model_config, params
    model_config = ModelConfig(**config.random_model.to_dict())
    specs = families.param_specs(model_config)
    shardings = None if mesh is None else sharding.param_shardings(specs, mesh)
    initialize = jax.jit(lambda key: init_params(specs, key, dtype), out_shardings=shardings)
    return model_config, initialize(jax.random.key(config.seed))


def filled_cache(
    config: ModelConfig,
    num_sinks: int,
    window: int,
    num_seen: int,
    dtype=jnp.float32,
    batch_size: int = 1,
    seed: int = 0,
) -> SinkCache:
    """The cache of `batch_size` streams after `num_seen` tokens (stream indices 0..num_seen-1).

    The bookkeeping (`slot_positions`, `length`, `cursor`, `next_position`) is exactly what feeding
    `num_seen` tokens leaves (tests check it against `streamjax.prefill`), for a hybrid model's sliding
    layers' cache too; keys and values are random (in empty slots too, which attention masks), which
    changes no cost.
    """
    check_cache_shape(num_sinks, window)
    cache = init_cache(config, batch_size, num_sinks, window, dtype, first_position=num_seen)
    full_seed, sliding_seed = jax.random.split(jax.random.key(seed))
    sliding = None if cache.sliding is None else _filled(cache.sliding, num_seen, sliding_seed)
    return _filled(cache, num_seen, full_seed).replace(sliding=sliding)


def _filled(cache: SinkCache, num_seen: int, key: jax.Array) -> SinkCache:
    """One layer type's cache (its own sinks and window) as `num_seen` tokens leave it, random keys and values."""
    num_sinks, window, batch_size = cache.num_sinks, cache.window, cache.batch_size
    sinks = np.arange(num_sinks)
    ring_written = max(num_seen - num_sinks, 0)  # tokens that ever went into the ring
    ring = np.arange(window)
    last_lap = ring + window * ((ring_written - 1 - ring) // window)  # latest ring token in each slot
    slots = np.concatenate(
        [np.where(sinks < num_seen, sinks, 0), np.where(ring < ring_written, num_sinks + last_lap, 0)]
    )
    length = min(num_seen, num_sinks + window)
    key_seeds, value_seeds = jnp.split(jax.random.split(key, 2 * len(cache.keys)), 2)
    return cache.replace(
        keys=tuple(jax.random.normal(k, keys.shape, keys.dtype) for k, keys in zip(key_seeds, cache.keys)),
        values=tuple(jax.random.normal(k, values.shape, values.dtype) for k, values in zip(value_seeds, cache.values)),
        slot_positions=jnp.asarray(np.broadcast_to(_wrap_int32(slots), (batch_size, cache.capacity))),
        length=jnp.full((batch_size,), length, jnp.int32),
        cursor=jnp.full((batch_size,), ring_written % window, jnp.int32),
    )


def _wrap_int32(values: np.ndarray) -> np.ndarray:
    return ((np.asarray(values, np.int64) + 2**31) % 2**32 - 2**31).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Machine limits


def machine_limits(config) -> dict[str, Any]:
    """Measured memory bandwidth (bytes/s) and matmul throughput (FLOP/s) of the default device."""
    return {
        "bandwidth": machine.measure_bandwidth(
            config.bandwidth_bytes, loading.parse_dtype(config.dtype), config.repeats
        ),
        "matmul": {
            name: machine.measure_matmul(config.matmul_size, jnp.dtype(name), config.repeats)
            for name in ("float32", "bfloat16")
        },
    }


# ----------------------------------------------------------------------------------------------
# Decode latency and memory against cache size


def time_decode(
    params: dict, config: ModelConfig, cache: SinkCache, repeats: int, warmup: int
) -> tuple[dict[str, Any], SinkCache]:
    """Per-token latency and memory of the jitted step (T = 1, cache donated) from `cache`.

    Returns the measurements and the cache after the `warmup + repeats` decoded tokens.
    """
    tokens = jnp.ones((cache.batch_size, 1), jnp.int32)
    compiled = jitted_forward.lower(params, cache, tokens, config).compile()  # the program `streamjax.step` runs
    state = {"cache": cache}

    def one_token():
        out = compiled(params, state["cache"], tokens)
        state["cache"] = out.cache
        return out.logits

    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with machine.sampled_memory() as runtime:
        timing = machine.time_calls(one_token, repeats, warmup)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / (warmup + repeats)
    memory = {"compiled": machine.compiled_memory(compiled), "runtime": runtime, "minor_page_faults_per_token": faults}
    return {"timing": timing, "memory": memory}, state["cache"]


def time_recompute(params: dict, config: ModelConfig, window: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Per-token latency of a plain causal pass over the last `window` tokens (the last position's
    logits only, as `evaluation` re-computes), and its memory."""
    tokens = jnp.ones((1, window), jnp.int32)
    compiled = jitted_forward.lower(params, None, tokens, config, logits="last").compile()
    with machine.sampled_memory() as runtime:
        timing = machine.time_calls(lambda: compiled(params, None, tokens), repeats, warmup)
    return {"timing": timing, "memory": {"compiled": machine.compiled_memory(compiled), "runtime": runtime}}


def decode_vs_cache_size(params: dict, config: ModelConfig, bench, bandwidth: float, matmul: float) -> dict[str, Any]:
    """Latency and memory of every method in `bench.methods` at every size of `bench.cache_sizes`.

    `bandwidth` (bytes/s) and `matmul` (FLOP/s) are the machine's limits each row is compared with.
    """
    dtype = jax.tree.leaves(params)[0].dtype
    methods = {method: [] for method in perplexity.parse_methods(bench.methods, METHODS)}
    for size in bench.cache_sizes:  # methods side by side at each size, so drift hits them alike
        for method, rows in methods.items():
            log.log("efficiency", f"decode: {method} at cache size {size}")
            row = _decode_row(params, config, bench, method, size, dtype, bandwidth)
            row["matmul_fraction"] = row["flops_per_token"] / row["timing"]["median_s"] / matmul
            rows.append({"cache_size": size, **row})
    return {"cache_sizes": list(bench.cache_sizes), "num_sinks": bench.num_sinks, "methods": methods}


def _decode_row(params, config: ModelConfig, bench, method: str, size: int, dtype, bandwidth: float) -> dict:
    if method == "recompute":
        row = time_recompute(params, config, size, bench.recompute_repeats, bench.recompute_warmup)
        # A causal pass over n tokens: n x n scores (the masked half included) and the head once.
        head = 2 * config.hidden_size * config.vocab_size
        row["flops_per_token"] = size * costs.flops_per_token(params, config, keys_per_query=size) - (size - 1) * head
        return row
    num_sinks = 0 if method == "dense" else bench.num_sinks
    cache = filled_cache(config, num_sinks, size - num_sinks, size, dtype, seed=size)
    read_bandwidth = machine.measure_read_bandwidth(bench.bandwidth_bytes, bench.bandwidth_repeats)  # same conditions
    row, _ = time_decode(params, config, cache, bench.repeats, bench.warmup)
    latency, moved = (
        row["timing"]["median_s"],
        costs.param_bytes_per_token(params, config) + costs.cache_bytes(config, size, dtype),
    )
    row.update(
        bytes_per_token=moved,
        ideal_s=moved / bandwidth,
        bandwidth_fraction=moved / bandwidth / latency,
        adjacent_read_bytes_per_s=read_bandwidth,
        adjacent_bandwidth_fraction=moved / read_bandwidth / latency,
        flops_per_token=costs.flops_per_token(
            params, config, keys_per_query=size + 1, sliding_keys_per_query=check_sliding_cache(config, 0, None) + 1
        ),
    )
    return row


# ----------------------------------------------------------------------------------------------
# Evaluation routes


def route_throughput(params: dict, config: ModelConfig, bench, matmul_flops: float) -> dict[str, Any]:
    """Predictions per second of `perplexity.evaluate` on the token and the chunk route.

    After one untimed call each (compilation), the routes are timed alternately, `route_repeats`
    times each, so that a machine whose speed drifts affects both alike.
    """
    window, chunk_size = bench.route_window, bench.route_chunk_size
    tokens = np.random.RandomState(bench.seed).randint(0, config.vocab_size, size=bench.chunk_route_tokens + 1)
    counts = {"token": bench.token_route_tokens, "chunk": bench.chunk_route_tokens}
    new_per_pass = {"token": 1, "chunk": chunk_size}
    ring = check_sliding_cache(config, 0, None)  # a hybrid model's sliding layers' ring (0 without sliding layers)
    specs = {r: perplexity.EvalSpec("streaming", bench.num_sinks, window, r, chunk_size) for r in counts}
    calls = {
        r: functools.partial(perplexity.evaluate, params, config, tokens[: counts[r] + 1], specs[r]) for r in counts
    }
    results, nll, times = {}, {}, {route: [] for route in counts}
    for route, call in calls.items():
        log.log("efficiency", f"routes: {route} route over {counts[route]} predictions (first call)")
        start = time.perf_counter()
        nll[route] = call()
        results[route] = {"num_predictions": counts[route], "first_call_s": time.perf_counter() - start}
    for _ in range(bench.route_repeats):
        for route, call in calls.items():
            times[route].append(machine.time_calls(call, repeats=1, warmup=0)["median_s"])
    for route, result in results.items():
        median = statistics.median(times[route])
        new = new_per_pass[route]
        flops = costs.flops_per_token(params, config, bench.num_sinks + window + new, sliding_keys_per_query=ring + new)
        result.update(
            timing={"median_s": median, "min_s": min(times[route]), "times_s": times[route]},
            tokens_per_s=counts[route] / median,
            flops_per_token=flops,
            flops_per_s=flops * counts[route] / median,
            matmul_fraction=flops * counts[route] / median / matmul_flops,
        )
    return {
        "num_sinks": bench.num_sinks,
        "window": window,
        "chunk_size": chunk_size,
        **results,
        "speedup": results["chunk"]["tokens_per_s"] / results["token"]["tokens_per_s"],
        **route_agreement(params, config, bench, tokens, nll["chunk"]),
    }


def route_agreement(params: dict, config: ModelConfig, bench, tokens: np.ndarray, chunk_nll: np.ndarray) -> dict:
    """The token route's NLL over the first `route_compare_tokens` predictions (past the cache and past
    several chunks) against the chunk route's on the same predictions."""
    count = bench.route_compare_tokens
    log.log("efficiency", f"routes: token route over {count} predictions, compared with the chunk route")
    spec = perplexity.EvalSpec("streaming", bench.num_sinks, bench.route_window, "token", bench.route_chunk_size)
    token_nll = perplexity.evaluate(params, config, tokens[: count + 1], spec)
    difference = np.abs(token_nll - chunk_nll[:count])
    return {
        "compared_predictions": count,
        "max_abs_nll_difference": float(difference.max()),
        "max_abs_nll_difference_past_cache": float(difference[bench.num_sinks + bench.route_window :].max()),
    }


def check_route_config(bench) -> None:
    """Raise ValueError unless the route comparison reaches past the cache and over several chunks."""
    needed = bench.num_sinks + bench.route_window + bench.route_chunk_size
    if not needed < bench.route_compare_tokens <= bench.chunk_route_tokens:
        raise ValueError(
            f"route_compare_tokens ({bench.route_compare_tokens}) must exceed num_sinks + route_window + "
            f"route_chunk_size ({needed}: past the cache and over two chunks) and be at most chunk_route_tokens "
            f"({bench.chunk_route_tokens})"
        )


# ----------------------------------------------------------------------------------------------
# Long streams


def long_stream(params: dict, config: ModelConfig, bench) -> dict[str, Any]:
    """Decode cost at `early_position` vs `late_position`, memory after `memory_positions` tokens.

    One stream goes through the positions in increasing order; the memory of a position is the most
    in use while the stream got there from the previous one and decoded there. The decode costs of
    the early and the late position are then timed alternately for `long_stream_rounds` rounds (a
    copy of the cache at the early position is kept for that) and each is the median of all rounds.
    """
    num_sinks, window = bench.num_sinks, bench.route_window
    dtype = jax.tree.leaves(params)[0].dtype
    result = {"num_sinks": num_sinks, "window": window, "state": _state_note(bench.long_stream_streamed)}
    cache, seen, kept = init_cache(config, 1, num_sinks, window, dtype), 0, {}
    for position in sorted({bench.early_position, bench.late_position, *bench.memory_positions}):
        log.log("efficiency", f"long stream: token {position}")
        with machine.sampled_memory() as runtime:
            if bench.long_stream_streamed:
                cache = _stream(params, config, cache, position - seen, bench.stream_chunk_size, seed=position)
            else:
                cache = filled_cache(config, num_sinks, window, position, dtype, seed=position)
            measured, cache = time_decode(params, config, cache, bench.repeats, bench.warmup)
        seen = position + bench.warmup + bench.repeats
        measured["memory"]["runtime"] = runtime
        result[str(position)] = {"position": position, **measured}
        if position == bench.early_position:
            kept[position] = jax.tree.map(jnp.copy, cache)
    kept[bench.late_position] = cache
    for _ in range(bench.long_stream_rounds - 1):
        for position in (bench.early_position, bench.late_position):
            measured, kept[position] = time_decode(params, config, kept[position], bench.repeats, warmup=1)
            result[str(position)]["timing"]["times_s"] += measured["timing"]["times_s"]
    for position in (bench.early_position, bench.late_position):
        times = result[str(position)]["timing"]["times_s"]
        result[str(position)]["timing"].update(median_s=statistics.median(times), min_s=min(times))
    early, late = (
        result[str(position)]["timing"]["median_s"] for position in (bench.early_position, bench.late_position)
    )
    low, high = (
        result[str(position)]["memory"]["runtime"]["phase_peak_bytes"] for position in sorted(bench.memory_positions)
    )
    result.update(late_over_early=late / early, memory_peak_ratio=high / low)
    result["generation"] = _generation_early_late(params, config, bench, kept)
    return result


def _generation_early_late(params, config: ModelConfig, bench, kept: dict) -> dict[str, Any]:
    """Generation's per-token cost and memory from the stream's state at the early and the late position
    (`decode_block`, greedy, no limit), timed alternately for `generation_rounds` rounds."""
    states, times, memory = {}, {position: [] for position in kept}, {}
    for position, cache in kept.items():
        states[position] = _generation_state(params, config, jax.tree.map(jnp.copy, cache), bench.generation_block)
    for _ in range(bench.generation_rounds):
        for position in kept:
            with machine.sampled_memory() as runtime:
                states[position], seconds = _time_block(params, config, states[position], bench.generation_block)
            times[position].append(seconds / bench.generation_block)
            memory[position] = max(memory.get(position, 0), runtime["phase_peak_bytes"] or 0)
    early, late = (statistics.median(times[p]) for p in (bench.early_position, bench.late_position))
    return {
        "block_steps": bench.generation_block,
        **{str(p): {"per_token_s": times[p], "phase_peak_bytes": memory[p]} for p in kept},
        "late_over_early": late / early,
        "memory_peak_ratio": memory[bench.late_position] / memory[bench.early_position],
    }


def _generation_state(params, config: ModelConfig, cache: SinkCache, steps: int) -> generation.DecodeState:
    """A greedy generation without limit, started from `cache` with one token, after one block of `steps`
    steps (so the program the timed blocks run is compiled before they start)."""
    batch = cache.batch_size
    settings = sampling.sampling_settings(batch, temperature=0.0)
    stops = stopping.stop_conditions(batch, max_new_tokens=None)
    state, _, _ = generation.start(params, cache, [[1]] * batch, config, settings, stops, chunk_size=1)
    return generation.decode_block(params, state, config, settings, stops, steps)[0]


def _time_block(params, config: ModelConfig, state, steps: int) -> tuple[generation.DecodeState, float]:
    """(state, seconds) of one `decode_block` of `steps` steps, tokens on the host."""
    batch = state.pending.shape[0]
    settings = sampling.sampling_settings(batch, temperature=0.0)
    stops = stopping.stop_conditions(batch, max_new_tokens=None)
    start = time.perf_counter()
    state, tokens, _ = generation.decode_block(params, state, config, settings, stops, steps)
    return state, time.perf_counter() - start


def generation_speed(params: dict, config: ModelConfig, bench) -> dict[str, Any]:
    """Generation against the bare step on a full cache of num_sinks + route_window slots: per-token
    cost at batch 1 (a `decode_block` of `generation_block` steps against as many jitted steps, timed
    alternately for `generation_rounds` rounds) and tokens per second at batch `generation_batch`."""
    num_sinks, window, steps = bench.num_sinks, bench.route_window, bench.generation_block
    dtype = jax.tree.leaves(params)[0].dtype
    result: dict[str, Any] = {"num_sinks": num_sinks, "window": window, "block_steps": steps}
    step_cache = filled_cache(config, num_sinks, window, num_sinks + window, dtype, seed=1)
    _, step_cache = time_decode(params, config, step_cache, repeats=1, warmup=1)
    states = {batch: _generation_state(params, config, filled_cache(config, num_sinks, window, num_sinks + window,
                                                                  dtype, batch_size=batch, seed=2), steps)
              for batch in (1, bench.generation_batch)}  # fmt: skip
    times: dict[str, list[float]] = {"step": [], "batch_1": [], f"batch_{bench.generation_batch}": []}
    log.log(
        "efficiency",
        f"generation: batch 1 and {bench.generation_batch} against the bare step, {bench.generation_rounds} rounds",
    )
    for _ in range(bench.generation_rounds):
        measured, step_cache = time_decode(params, config, step_cache, repeats=steps, warmup=0)
        times["step"].append(sum(measured["timing"]["times_s"]) / steps)
        for batch in states:
            states[batch], seconds = _time_block(params, config, states[batch], steps)
            times[f"batch_{batch}"].append(seconds / steps)
    for name, values in times.items():
        batch = 1 if name == "step" else int(name.split("_")[1])
        median = statistics.median(values)
        result[name] = {"per_step_s": values, "median_s": median, "tokens_per_s": batch / median}
    result["over_step"] = result["batch_1"]["median_s"] / result["step"]["median_s"]
    result["batch_speedup"] = (
        result[f"batch_{bench.generation_batch}"]["tokens_per_s"] / result["batch_1"]["tokens_per_s"]
    )
    result["weight_matmuls"] = _weight_matmul_cost(params, config, (1, bench.generation_batch), bench.repeats)
    return result


def _weight_matmuls(params: dict, x: jax.Array) -> jax.Array:
    """Every layer's weight matrices (each leaf of 2 or more dimensions, as a matrix whose rows are
    the hidden width where its first dimension is, else whose columns are its last dimension) applied
    to `x` [B, rows]: the decode step's weight matmuls alone, with no attention and no cache."""
    hidden = x.shape[1]
    total = jnp.zeros((), x.dtype)
    for layer in params["layers"]:
        for weight in jax.tree.leaves(layer):
            if weight.ndim < 2:
                continue
            matrix = weight.reshape(hidden, -1) if weight.shape[0] == hidden else weight.reshape(-1, weight.shape[-1])
            rows = x if matrix.shape[0] == hidden else jnp.ones((x.shape[0], matrix.shape[0]), x.dtype)
            total = total + jnp.sum(rows @ matrix)
    return total


def _weight_matmul_cost(params: dict, config: ModelConfig, batches: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Median seconds of the layers' weight matmuls alone (`_weight_matmuls`, one jitted program) at
    each batch size: what the backend's matrix multiply charges for more rows over the same weights."""
    dtype = jax.tree.leaves(params)[0].dtype
    result: dict[str, Any] = {}
    for batch in batches:
        x = jnp.ones((batch, config.hidden_size), dtype)
        compiled = jax.jit(_weight_matmuls).lower(params, x).compile()
        result[f"batch_{batch}_s"] = machine.time_calls(lambda: compiled(params, x), repeats, warmup=2)["median_s"]
    result["ratio"] = result[f"batch_{max(batches)}_s"] / result[f"batch_{min(batches)}_s"]
    return result


def _state_note(streamed: bool) -> str:
    if streamed:
        return (
            "streamed: random tokens fed with the chunk route (streamjax.prefill, chunks of stream_chunk_size) up to "
            "each position"
        )
    return (
        "set (not streamed): a cache in exactly the state streaming leaves after that many tokens (slot_positions, "
        "length, cursor, next_position as after feeding them; tests/test_efficiency.py checks this against "
        "streamjax.prefill), keys and values random; the same shapes and program at every position, so the "
        "late/early ratios cannot show a cost that grows with the stream"
    )


def _stream(params, config: ModelConfig, cache: SinkCache, count: int, chunk_size: int, seed: int) -> SinkCache:
    """Feed `count` random tokens in chunks of `chunk_size` (the chunk route, `streamjax.prefill`)."""
    if count <= 0:
        return cache
    tokens = np.random.RandomState(seed).randint(0, config.vocab_size, size=(1, count))
    return streamjax.prefill(params, cache, tokens, config, chunk_size, logits="none")[1]


# ----------------------------------------------------------------------------------------------
# Optional peer: transformers' own generation of the same model file (the only place torch is used)


def check_peer_config(bench) -> None:
    """Raise ValueError when the transformers peer is asked for a model it cannot load."""
    if bench.transformers_peer and bench.model == "random":
        raise ValueError(
            "transformers_peer=True needs a model file transformers can load (a named model, a .gguf file or a "
            "checkpoint directory); config.model is 'random'. Set config.transformers_peer=False or name a model."
        )
    if bench.transformers_peer and bench.peer_new_tokens < 2:
        raise ValueError(f"peer_new_tokens must be >= 2 (per-token gaps are timed), got {bench.peer_new_tokens}")


def transformers_peer(bench, streamjax_per_token_s: float) -> dict[str, Any]:
    """transformers' greedy `generate` of `bench.model` on the same machine, batch 1, its default cache
    (for a model with sliding layers, its sliding-window layers): after a prompt of num_sinks + route_window
    random tokens (the global layers then hold as many tokens as streamjax's full cache), the wall time
    between consecutive generated tokens (stamped by a logits processor, so prefill is left out), over
    `peer_rounds` calls after one untimed call. `streamjax_per_token_s` is streamjax's generation at batch 1
    on a full num_sinks + route_window cache, measured earlier in the same run.
    """
    import torch
    import transformers

    model = transformers_model(loading.resolve_model(bench.model), getattr(torch, bench.dtype))
    prompt_length = bench.num_sinks + bench.route_window
    prompt = torch.as_tensor(
        np.random.RandomState(bench.seed).randint(0, model.config.get_text_config().vocab_size, (1, prompt_length))
    )
    log.log("efficiency", f"transformers peer: {bench.peer_rounds} generations of {bench.peer_new_tokens} tokens")
    load_before = machine.load_average()  # torch's threads slow down far more than XLA's on a busy machine
    gaps, prompt_times = [], []
    for round_number in range(bench.peer_rounds + 1):
        start = time.perf_counter()
        stamps, cache = generate_stamped(model, prompt, bench.peer_new_tokens)
        if round_number:  # the first call is untimed (allocations, lazy initialisation)
            prompt_times.append(stamps[0] - start)
            gaps += np.diff(stamps).tolist()
    per_token = statistics.median(gaps)
    return {
        "library": "transformers",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "attn_implementation": model.config._attn_implementation,
        "cache": _cache_layout(cache),
        "prompt_tokens": prompt_length,
        "new_tokens": bench.peer_new_tokens,
        "rounds": bench.peer_rounds,
        "prompt_s": prompt_times,
        "per_token_s": gaps,
        "median_per_token_s": per_token,
        "tokens_per_s": 1 / per_token,
        "streamjax_generation_per_token_s": streamjax_per_token_s,
        "transformers_over_streamjax": per_token / streamjax_per_token_s,
    }


def transformers_model(source: loading.ModelSource, dtype):
    """transformers' own load of the model file (a GGUF dequantized as transformers does it), eval mode."""
    import transformers

    if source.kind == "gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source.path.parent, gguf_file=source.path.name, dtype=dtype
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    return model.eval()


def generate_stamped(model, prompt, new_tokens: int) -> tuple[list[float], Any]:
    """(when each of `new_tokens` greedy tokens was chosen, the cache at the end) of one `model.generate`."""
    import torch
    import transformers

    stamps = _TimeStamps()
    with torch.inference_mode():
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, logits_processor=transformers.LogitsProcessorList([stamps]),
            return_dict_in_generate=True,
        )  # fmt: skip
    return stamps.times, output.cache


class _TimeStamps:
    """A logits processor that only records when it is called: once per generated token, after the forward."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _cache_layout(cache) -> dict[str, Any]:
    """The cache transformers generated with: its class, and per layer its class and the tokens it held at the end."""
    layers = [{"type": type(layer).__name__, "tokens": int(layer.keys.shape[-2])} for layer in cache.layers]
    return {"type": type(cache).__name__, "layers": layers}


# ----------------------------------------------------------------------------------------------
# On a mesh: a decode step and a training step over several devices (and processes), and their collectives


def check_mesh_config(bench) -> None:
    """Raise ValueError for mesh fields that cannot describe a run, before JAX starts."""
    if bench.mesh:
        sharding.parse_mesh(bench.mesh)
    distributed.parse(bench.distributed)
    if not bench.num_sinks < bench.mesh_cache_size:
        raise ValueError(f"mesh_cache_size ({bench.mesh_cache_size}) must exceed num_sinks ({bench.num_sinks})")
    for field in ("mesh_decode_batch", "mesh_train_batch", "mesh_traced_steps"):
        if bench[field] < 1:
            raise ValueError(f"{field} must be >= 1, got {bench[field]}")


def mesh_costs(params: dict, config: ModelConfig, bench, mesh: Mesh) -> dict[str, Any]:
    """The mesh, and a decode step and a training step of the model laid over it (`step_costs` of each)."""
    devices = list(mesh.devices.flat)
    return {
        "spec": bench.mesh,
        "axes": dict(mesh.shape),
        "processes": jax.process_count(),
        "devices": len(devices),
        "device_processes": [device.process_index for device in devices],
        "decode": decode_on_mesh(params, config, bench, mesh),
        "train": train_on_mesh(params, config, bench, mesh),
    }


def decode_on_mesh(params: dict, config: ModelConfig, bench, mesh: Mesh) -> dict[str, Any]:
    """`step_costs` of the jitted decode step (T = 1, cache donated) of `mesh_decode_batch` streams on a full
    StreamingLLM cache of `mesh_cache_size` slots; `params` are on their shards of `mesh`, the cache is put on
    its shards."""
    batch, size = bench.mesh_decode_batch, bench.mesh_cache_size
    dtype = jax.tree.leaves(params)[0].dtype
    log.log("efficiency", f"mesh {bench.mesh}: decode step, batch {batch}, cache {size}")
    cache = filled_cache(config, bench.num_sinks, size - bench.num_sinks, size, dtype, batch_size=batch)
    state = {"cache": sharding.shard_cache(cache, mesh)}
    tokens = jax.device_put(np.ones((batch, 1), np.int32), sharding.batch_sharding(mesh, batch))
    compiled = jitted_forward.lower(params, state["cache"], tokens, config).compile()

    def one_token():
        out = compiled(params, state["cache"], tokens)
        state["cache"] = out.cache
        return out.logits

    return {"batch": batch, "cache_size": size, **step_costs(compiled, one_token, bench, mesh)}


def train_on_mesh(params: dict, config: ModelConfig, bench, mesh: Mesh) -> dict[str, Any]:
    """`step_costs` of one training step (`streamjax.training`: forward, backward, AdamW; state donated) of
    `mesh_train_batch` samples of `mesh_train_length` tokens, state and batch on their shards of `mesh`."""
    train_config = training.TrainConfig(
        batch_size=bench.mesh_train_batch, sample_length=bench.mesh_train_length, warmup_steps=0, seed=bench.seed
    )
    text = np.random.RandomState(bench.seed).randint(0, config.vocab_size, bench.mesh_train_tokens).astype(np.int32)
    training.check_train_config(train_config, config, text.shape[0], mesh)
    log.log("efficiency", f"mesh {bench.mesh}: training step, {bench.mesh_train_batch} x {bench.mesh_train_length}")
    state = {"train": training.init_state(config, train_config, params, mesh)}
    tokens = training.place_tokens(text, mesh)
    compiled = training.make_train_step(config, train_config, state["train"], mesh).lower(state["train"], tokens)
    compiled = compiled.compile()

    def one_step():
        state["train"], metrics = compiled(state["train"], tokens)
        return metrics["loss"]

    shape = {"batch": bench.mesh_train_batch, "sample_length": bench.mesh_train_length}
    return {**shape, **step_costs(compiled, one_step, bench, mesh)}


def step_costs(compiled, call, bench, mesh: Mesh) -> dict[str, Any]:
    """A compiled step's collectives (`streamjax.runs.collectives`) and its time: the step timed alone
    (`repeats` calls after `warmup`), then `mesh_traced_steps` steps under the profiler, whose trace gives each
    collective's seconds per step (mean over this process's devices). The figures are this process's (the
    writer's); `per_process` has every process's step, traced step and collective seconds (gathered as float32)."""
    device_processes = [device.process_index for device in mesh.devices.flat]
    found = collectives.find_collectives(compiled.as_text(), mesh.size)
    timing = machine.time_calls(call, bench.repeats, bench.warmup)
    events, traced_step_s = collectives.profile_events(call, bench.mesh_traced_steps)
    local = device_processes.count(jax.process_index())
    seconds = collectives.collective_seconds(events, [c.name for c in found], bench.mesh_traced_steps, local)
    rows = [_collective_row(c, seconds.get(c.name), collectives.crosses_processes(c, device_processes)) for c in found]
    totals = _collective_totals(rows, traced_step_s)
    mine = [timing["median_s"], traced_step_s, totals["collective_s"], totals["cross_process_collective_s"]]
    everyone = np.asarray(multihost_utils.process_allgather(np.asarray(mine))).reshape(-1, len(mine))
    per_process = [
        dict(zip(("process", "step_s", "traced_step_s", "collective_s", "cross_process_collective_s"), (i, *row)))
        for i, row in enumerate(everyone.tolist())
    ]
    return {"timing": timing, "traced_step_s": traced_step_s, **totals, "collectives": rows, "per_process": per_process}


def _collective_row(collective, measured: dict | None, crosses: bool | None) -> dict[str, Any]:
    """One collective as the report lists it; `measured` is its `collective_seconds` entry (None: no event)."""
    return {
        "name": collective.name,
        "op": collective.op,
        "shapes": [[dtype, list(dims)] for dtype, dims in collective.shapes],
        "bytes": collective.bytes,
        "groups": None if collective.groups is None else [list(group) for group in collective.groups],
        "crosses_processes": crosses,
        "seconds_per_step": None if measured is None else measured["seconds"],
        "executions_per_step": None if measured is None else measured["executions"],
    }


def _collective_totals(rows: list[dict], traced_step_s: float) -> dict[str, Any]:
    """Seconds and bytes (per device, per step) of all collectives and of those that cross processes, and their
    share of the traced step; a collective not seen in the trace counts one execution and no seconds, one whose
    groups were not read (`unread_groups`) is not counted as crossing."""
    crossing = [row for row in rows if row["crosses_processes"]]

    def seconds(selected):
        return sum(row["seconds_per_step"] or 0.0 for row in selected)

    def moved(selected):
        return sum(row["bytes"] * (row["executions_per_step"] or 1) for row in selected)

    return {
        "collective_s": seconds(rows),
        "collective_share": seconds(rows) / traced_step_s,
        "collective_bytes": moved(rows),
        "cross_process_collective_s": seconds(crossing),
        "cross_process_share": seconds(crossing) / traced_step_s,
        "cross_process_bytes": moved(crossing),
        "untimed_collectives": [row["name"] for row in rows if row["seconds_per_step"] is None],
        "unread_groups": [row["name"] for row in rows if row["groups"] is None],
    }


def run_on_mesh(config, workdir: pathlib.Path, mesh: Mesh) -> dict[str, Any]:
    """The mesh section alone (`mesh_costs`); process 0 writes `efficiency_mesh.json` and `results.md`
    (`mesh_table`)."""
    started = time.perf_counter()
    model_config, params = build_model(config, mesh)
    meta = {**describe(config, model_config, params), "made_by": provenance.made_by()}
    meta.update(
        processes=jax.process_count(),
        local_devices=jax.local_device_count(),
        load_average_before=machine.load_average(),
    )
    results = {"meta": meta, "mesh": mesh_costs(params, model_config, config, mesh)}
    meta.update(load_average_after=machine.load_average(), wall_s=time.perf_counter() - started)
    if distributed.is_writer():
        workdir.mkdir(parents=True, exist_ok=True)
        writes.write_text(workdir / "efficiency_mesh.json", json.dumps(results, indent=2, default=_json_default) + "\n")
        writes.write_text(workdir / "results.md", mesh_table(results) + "\n")
    return results


def mesh_table(results: dict[str, Any]) -> str:
    """The mesh section as a markdown table (milliseconds per step, shares of the traced step, bytes per device)
    under a line naming the mesh, the processes and the run."""
    mesh, meta = results["mesh"], results["meta"]
    lines = [
        f"mesh {mesh['spec']} over {mesh['processes']} process(es), {mesh['devices']} {meta['device']} devices "
        f"({meta['backend']}, jax {meta['jax_version']}); {meta['made_by']}",
        "",
        "| step | alone (ms) | traced (ms) | collectives (ms) | share | crossing processes (ms) | share | "
        "collectives | crossing | bytes | crossing bytes |",
        "|---|" + "---:|" * 10,
    ]
    for step in ("decode", "train"):
        row = mesh[step]
        crossing = sum(1 for collective in row["collectives"] if collective["crosses_processes"])
        lines.append(
            f"| {step} | {row['timing']['median_s'] * 1e3:.2f} | {row['traced_step_s'] * 1e3:.2f} | "
            f"{row['collective_s'] * 1e3:.2f} | {row['collective_share']:.2f} | "
            f"{row['cross_process_collective_s'] * 1e3:.2f} | {row['cross_process_share']:.2f} | "
            f"{len(row['collectives'])} | {crossing} | {row['collective_bytes']:,.0f} | "
            f"{row['cross_process_bytes']:,.0f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Targets, report, plots


def targets(results: dict[str, Any], bench) -> list[dict[str, Any]]:
    """The efficiency claims, each with its measured value and whether it holds."""
    decode, sizes = results["decode"]["methods"], results["decode"]["cache_sizes"]
    largest = max(sizes)
    claims = [("chunk route tokens/s over token route tokens/s", results["routes"]["speedup"], ">=", 10.0)]
    if "streaming" in decode and "recompute" in decode:
        ratio = _at(decode["recompute"], largest) / _at(decode["streaming"], largest)
        claims.append((f"re-computation over StreamingLLM per-token latency at cache {largest}", ratio, ">=", 20.0))
    claims.append(("|late / early per-token cost - 1|", abs(results["long_stream"]["late_over_early"] - 1), "<=", 0.10))
    claims.append(("|peak memory late / early - 1|", abs(results["long_stream"]["memory_peak_ratio"] - 1), "<=", 0.05))
    gen, late_gen = results["generation"], results["long_stream"]["generation"]
    claims += [
        ("generation per-token cost at batch 1 over the bare jitted step", gen["over_step"], "<=", 1.05),
        (f"generation tokens/s at batch {bench.generation_batch} over batch 1", gen["batch_speedup"], ">=", 4.0),
        ("|generation late / early per-token cost - 1|", abs(late_gen["late_over_early"] - 1), "<=", 0.10),
        ("|generation peak memory late / early - 1|", abs(late_gen["memory_peak_ratio"] - 1), "<=", 0.05),
    ]
    if "streaming" in decode and bench.target_cache_size in sizes:
        row = next(row for row in decode["streaming"] if row["cache_size"] == bench.target_cache_size)
        prefix = f"StreamingLLM decode at cache {bench.target_cache_size}: bytes / latency over"
        claims.append(
            (f"{prefix} the read-only sum's bandwidth timed just before", row["adjacent_bandwidth_fraction"], ">=", 0.5)
        )
        claims.append((f"{prefix} the best bandwidth the benchmark measured", row["bandwidth_fraction"], ">=", 0.5))
    return [
        {
            "name": name,
            "value": value,
            "target": f"{op} {bound}",
            "met": bool(value >= bound if op == ">=" else value <= bound),
        }
        for name, value, op, bound in claims
    ]


def _at(rows: list[dict], cache_size: int) -> float:
    return next(row["timing"]["median_s"] for row in rows if row["cache_size"] == cache_size)


def describe(config, model_config: ModelConfig, params: dict) -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "model": config.model,
        "model_config": {key: value for key, value in vars(model_config).items()},
        "dtype": config.dtype,
        "num_params": int(sum(leaf.size for leaf in jax.tree.leaves(params))),
        "param_bytes": int(sum(leaf.nbytes for leaf in jax.tree.leaves(params))),
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "config": config.to_dict(),
    }


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run every measurement of `config`, write `efficiency.json` and the plots to `workdir`; with a
    `config.mesh`, the mesh section alone (`run_on_mesh`)."""
    check_route_config(config)
    check_peer_config(config)
    check_mesh_config(config)
    distributed.initialize(config.distributed)
    mesh = sharding.config_mesh(config.mesh)
    workdir = pathlib.Path(workdir)
    if mesh is not None:
        return run_on_mesh(config, workdir, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), machine.load_average()
    model_config, params = build_model(config)
    results = {"meta": {**describe(config, model_config, params), "made_by": provenance.made_by()}}
    log.log("efficiency", "machine limits")
    results["machine"] = machine_limits(config)
    bandwidth = results["machine"]["bandwidth"]["best_bytes_per_s"]
    matmul = results["machine"]["matmul"][jnp.dtype(loading.parse_dtype(config.dtype)).name]["flops_per_s"]
    results["decode"] = decode_vs_cache_size(params, model_config, config, bandwidth, matmul)
    results["routes"] = route_throughput(params, model_config, config, matmul)
    results["generation"] = generation_speed(params, model_config, config)
    results["long_stream"] = long_stream(params, model_config, config)
    if config.transformers_peer:
        results["peer"] = transformers_peer(config, results["generation"]["batch_1"]["median_s"])
    results["targets"] = targets(results, config)
    results["meta"].update(load_average_before=load_before, load_average_after=machine.load_average())
    results["meta"]["wall_s"] = time.perf_counter() - started
    writes.write_text(workdir / "efficiency.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    plot_all(results, workdir)
    return results


def _json_default(value):
    if isinstance(value, (np.generic, jnp.dtype)):
        return value.item() if isinstance(value, np.generic) else str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def plot_all(results: dict[str, Any], workdir: pathlib.Path) -> None:
    """latency_vs_cache.png, memory_vs_cache.png and route_throughput.png in `workdir`."""
    methods = results["decode"]["methods"]
    latency = {method: [row["timing"]["median_s"] * 1e3 for row in rows] for method, rows in methods.items()}
    memory = {method: [_peak_gb(row) for row in rows] for method, rows in methods.items()}
    sizes = results["decode"]["cache_sizes"]
    title = f"{results['meta']['model']} ({results['meta']['dtype']}, {results['meta']['device']})"
    footer = results["meta"].get("made_by", "")
    _line_plot(workdir / "latency_vs_cache.png", sizes, latency, "per-token latency (ms)", title, footer, log_y=True)
    _line_plot(workdir / "memory_vs_cache.png", sizes, memory, "memory (GB, XLA buffer assignment)", title, footer)
    routes = results["routes"]
    bars = {
        "token route": routes["token"]["tokens_per_s"],
        f"chunk route ({routes['chunk_size']})": routes["chunk"]["tokens_per_s"],
    }
    _bar_plot(
        workdir / "route_throughput.png", bars, f"{title}, S + W = {routes['num_sinks']} + {routes['window']}", footer
    )


def _peak_gb(row: dict) -> float:
    compiled = row["memory"]["compiled"]
    return np.nan if compiled is None else compiled["peak_bytes"] / 1e9


def _line_plot(
    path, sizes, series: dict[str, list[float]], ylabel: str, title: str, footer: str, log_y: bool = False
) -> None:
    figure, (axes,) = plots.new_figure(1, 1, width=6.0, height=4.0)
    for (name, values), marker in zip(series.items(), "osD^v"):
        axes.plot(sizes, values, marker=marker, markerfacecolor="none", label=name)
    from matplotlib.ticker import ScalarFormatter

    axes.set_xscale("log", base=2)
    if log_y:
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.set_xlabel("cache size (tokens)")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    plots.finish_figure(figure, path, footer=footer)


def _bar_plot(path, bars: dict[str, float], title: str, footer: str) -> None:
    figure, (axes,) = plots.new_figure(1, 1, width=6.0, height=4.0)
    positions = np.arange(len(bars))
    axes.bar(positions, list(bars.values()), color=["tab:gray", "tab:blue"][: len(bars)])
    axes.set_xticks(positions, list(bars))
    axes.set_ylabel("evaluated tokens per second")
    axes.set_title(title, fontsize=9)
    for position, value in zip(positions, bars.values()):
        axes.annotate(f"{value:.1f}", (position, value), ha="center", va="bottom", fontsize=8)
    plots.finish_figure(figure, path, footer=footer)


if __name__ == "__main__":
    main(run)
