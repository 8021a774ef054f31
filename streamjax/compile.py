"""`model_jit`: `jax.jit` for the functions that run the model, with the XLA options the cache needs.

On CPU:
- Each layer's cache arrays are read by attention and then written in place (the cache is donated).
  XLA's default copy insertion cannot see that every read comes before the write and copies the
  whole cache each step; its region analysis sees it.
- The default scheduler starts every layer's RoPE rotation of its cached keys at once, at the start
  of a step, so all of them are alive together in fresh memory that the OS maps in again each step
  (23,000 page faults per decode step at cache 4096). The memory-optimised scheduler rotates each
  layer's keys where that layer needs them, in memory reused from layer to layer (about 70 faults;
  the SmolLM2 decode step at cache 4096 took 75-79 instead of 96-108 ms).
The options are chosen for the backend in use at the first call (nothing is initialised at import).
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
    """A `jax.jit` of `fun` per backend, each compiled with that backend's `BACKEND_OPTIONS`."""

    def __init__(self, fun: Callable, **jit_kwargs):
        self._fun, self._jit_kwargs, self._by_backend = fun, jit_kwargs, {}
        functools.update_wrapper(self, fun)

    def jitted(self, nested: bool = False):
        """The jit for the default backend; `nested` (called inside another trace): one without options,
        which only a top-level jit may carry (the outer one's apply)."""
        backend = None if nested else jax.default_backend()
        if backend not in self._by_backend:
            options = {"compiler_options": BACKEND_OPTIONS[backend]} if backend in BACKEND_OPTIONS else {}
            self._by_backend[backend] = jax.jit(self._fun, **options, **self._jit_kwargs)
        return self._by_backend[backend]

    def __call__(self, *args, **kwargs):
        nested = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return self.jitted(nested)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted().lower(*args, **kwargs)

    def _cache_size(self) -> int:
        """Programs compiled so far for the default backend (tests check that streams compile once)."""
        return self.jitted()._cache_size()


def model_jit(**jit_kwargs) -> Callable[[Callable], ModelJit]:
    """Decorator: `@model_jit(static_argnames=..., donate_argnames=...)` takes `jax.jit`'s arguments."""
    return lambda fun: ModelJit(fun, **jit_kwargs)
