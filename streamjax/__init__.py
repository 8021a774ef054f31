"""streamjax: StreamingLLM (attention sinks + rolling window KV cache) in pure JAX."""

from streamjax import models
from streamjax.cache import SinkCache, init_cache
from streamjax.checkpoint import load_hf_directory
from streamjax.config import ModelConfig
from streamjax.decoding import feed_tokens, prefill, step

__all__ = ["models", "ModelConfig", "SinkCache", "feed_tokens", "init_cache", "load_hf_directory", "prefill", "step"]
