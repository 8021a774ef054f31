"""streamjax: StreamingLLM (attention sinks + rolling window KV cache) in pure JAX."""

from streamjax.files.weights import load_hf_directory
from streamjax.model import families
from streamjax.model.cache import SinkCache, init_cache
from streamjax.model.config import ModelConfig
from streamjax.model.transformer import ForwardOutput, forward
from streamjax.stream.feed import feed_tokens, prefill, step, token_route

__all__ = [
    "families", "ForwardOutput", "ModelConfig", "SinkCache", "feed_tokens", "forward", "init_cache",
    "load_hf_directory", "prefill", "step", "token_route",
]  # fmt: skip
