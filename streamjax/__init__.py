"""streamjax: StreamingLLM (attention sinks + rolling window KV cache) in pure JAX."""

from streamjax import families
from streamjax.cache import SinkCache, init_cache
from streamjax.config import ModelConfig
from streamjax.decoding import feed_tokens, prefill, step, token_route
from streamjax.model import ForwardOutput, forward
from streamjax.weights import load_hf_directory

__all__ = [
    "families", "ForwardOutput", "ModelConfig", "SinkCache", "feed_tokens", "forward", "init_cache",
    "load_hf_directory", "prefill", "step", "token_route",
]  # fmt: skip
