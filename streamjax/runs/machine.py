"""What the machine does and holds: resident memory, timed calls, memory bandwidth and matmul throughput.

Shared by every long job (the perplexity timeline, the chat's /stats, the dialogue samples) and the
efficiency benchmark (`experiments.efficiency`), which compares measured costs against these limits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc), else its peak so far (`peak_resident_bytes`)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_resident_bytes()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, None where the platform has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def time_calls(call: Callable[[], Any], repeats: int, warmup: int) -> dict[str, Any]:
    """Median, min and all wall times (s) of `repeats` calls of `call`, after `warmup` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def compiled_memory(compiled) -> dict[str, int] | None:
    """Bytes of a compiled function's buffers (XLA's buffer assignment); None where unavailable."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    arguments, outputs = stats.argument_size_in_bytes, stats.output_size_in_bytes
    aliased, temporaries = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    return {
        "argument_bytes": arguments,
        "output_bytes": outputs,
        "alias_bytes": aliased,
        "temp_bytes": temporaries,
        "peak_bytes": arguments + outputs - aliased + temporaries,
    }


@contextlib.contextmanager
def sampled_memory(interval: float = 0.002) -> Iterator[dict[str, Any]]:
    """Yields a dict that, once the context exits, holds the most memory in use during it.

    In use: the device's `bytes_in_use` where the backend reports memory stats (GPU, TPU), else the
    process's resident set (CPU), sampled every `interval` seconds in a thread. The dict also holds
    the use after the context and the high since the process started (`peak_bytes_in_use`, or
    ru_maxrss), which earlier phases may have set.
    """
    samples, stop = [in_use_bytes()], threading.Event()

    def sample():
        while not stop.wait(interval):
            samples.append(in_use_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        samples.append(in_use_bytes())
        stats = jax.devices()[0].memory_stats()
        on_device = bool(stats and "bytes_in_use" in stats)
        result.update(
            source="device.memory_stats() bytes_in_use" if on_device else "process resident set (/proc/self/statm)",
            phase_peak_bytes=max(samples),
            bytes_after=samples[-1],
            lifetime_peak_bytes=stats.get("peak_bytes_in_use") if on_device else peak_resident_bytes(),
        )


def in_use_bytes() -> int:
    """Bytes in use now: the device's `bytes_in_use` where the backend reports it (GPU, TPU), else the
    process's resident set (`resident_bytes`, CPU)."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_in_use" in stats:
        return stats["bytes_in_use"]
    return resident_bytes()


def peak_resident_bytes() -> int:
    """The most resident memory this process has used so far, in bytes (`ru_maxrss`)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_bandwidth(num_bytes: int, dtype, repeats: int) -> dict[str, Any]:
    """Bytes/s of three memory-bound kernels over `num_bytes`: a sum, an in-place +1 and a matvec."""
    state = {"array": jnp.ones((num_bytes // 4,), jnp.float32)}
    add_one = jax.jit(lambda x: x + 1, donate_argnums=0)

    def update_in_place():
        state["array"] = add_one(state["array"])
        return state["array"]

    columns = 4096
    matrix = jnp.ones((num_bytes // (columns * jnp.dtype(dtype).itemsize), columns), dtype)
    vector = jnp.ones((columns,), dtype)
    kernels = {
        "copy": (2 * num_bytes, update_in_place),  # reads and writes every byte
        "matvec": (matrix.nbytes, functools.partial(jax.jit(jnp.matmul), matrix, vector)),
    }
    results = {"reduce": _reduce_bandwidth(num_bytes, repeats)}
    for name, (moved, call) in kernels.items():
        timing = time_calls(call, repeats, warmup=1)
        results[name] = {"bytes": moved, "timing": timing, "bytes_per_s": moved / timing["median_s"]}
    results["best_bytes_per_s"] = max(results[name]["bytes_per_s"] for name in ("reduce", *kernels))
    return results


def measure_read_bandwidth(num_bytes: int, repeats: int) -> float:
    """Bytes/s of a sum over `num_bytes` of float32 (a read-only stream, like a decode step)."""
    return _reduce_bandwidth(num_bytes, repeats)["bytes_per_s"]


def _reduce_bandwidth(num_bytes: int, repeats: int) -> dict[str, Any]:
    array = jnp.ones((num_bytes // 4,), jnp.float32)
    timing = time_calls(functools.partial(_sum, array), repeats, warmup=1)
    return {"bytes": array.nbytes, "timing": timing, "bytes_per_s": array.nbytes / timing["median_s"]}


_sum = jax.jit(jnp.sum)


def measure_matmul(size: int, dtype, repeats: int) -> dict[str, Any]:
    """FLOP/s of a [size, size] @ [size, size] product in `dtype`."""
    keys = jax.random.split(jax.random.key(0))
    left, right = (jax.random.normal(key, (size, size), dtype) for key in keys)
    timing = time_calls(functools.partial(jax.jit(jnp.matmul), left, right), repeats, warmup=1)
    flops = 2 * size**3
    return {"size": size, "flops": flops, "timing": timing, "flops_per_s": flops / timing["median_s"]}
