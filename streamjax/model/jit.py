"""`model_jit`: `jax.jit` with the XLA options the cache needs, for the model's entry point and the
loops built on it.

On CPU:
- Each layer's cache arrays are read by attention and then written in place (the cache is donated).
  XLA's default copy insertion cannot see that every read comes before the write and copies the
  whole cache each step; its region analysis sees it.
- The default scheduler starts every layer's RoPE rotation of its cached keys at once, at the start
  of a step, so all of them are alive together in fresh memory that the OS maps in again each step.
  The memory-optimised scheduler rotates each layer's keys where that layer needs them, in memory
  reused from layer to layer (`experiments.efficiency` counts the minor page faults of every decode
  step, `memory.minor_page_faults_per_token`, which shows it).
The options are chosen for the backend in use at the first call (nothing is initialised at import).
Compiler options are allowed on a top-level jit only: a function jitted this way cannot be called
inside another jit; loops call the plain function (`streamjax.model.transformer.apply`) inside their own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {
        "xla_cpu_copy_insertion_use_region_analysis": True,
        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    }
}


class ModelJit:
    """`jax.jit` of `fun`, compiled with the default backend's `BACKEND_OPTIONS`."""

    def __init__(self, fun: Callable, **jit_kwargs):
        self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, None
        functools.update_wrapper(self, fun)

    @property
    def jitted(self):
        if self._jitted is None:
            options = BACKEND_OPTIONS.get(jax.default_backend())
            self._jitted = jax.jit(self._fun, **({"compiler_options": options} if options else {}), **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def _cache_size(self) -> int:
        """Programs compiled so far (tests count them: a stream of equal chunks compiles once)."""
        return self.jitted._cache_size()


def model_jit(**jit_kwargs) -> Callable[[Callable], ModelJit]:
    """Decorator: `@model_jit(static_argnames=..., donate_argnames=...)` takes `jax.jit`'s arguments."""
    return lambda fun: ModelJit(fun, **jit_kwargs)


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class CompileClock:
    """Seconds JAX spent tracing, lowering and compiling while the context was active (every time it
    was entered): what a run's timings report apart from its steady speed. A program the persistent
    compilation cache (`experiments.program.enable_persistent_cache`) already holds costs only its
    tracing and lowering."""

    def __init__(self):
        self.seconds = 0.0

    def _record(self, event: str, duration: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += duration

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def __exit__(self, *_) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)
