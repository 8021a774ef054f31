"""streamjax: StreamingLLM (attention sinks + rolling window KV cache) in pure JAX.

The public face; the rooms behind it: `streamjax.model` (the math), `streamjax.files` (model files and
text), `streamjax.stream` (feeding and generating), `streamjax.runs` (what long jobs need).
"""

from streamjax.files.loading import load_model
from streamjax.files.weights import load_hf_directory
from streamjax.model import families
from streamjax.model.cache import SinkCache, init_cache
from streamjax.model.config import ModelConfig
from streamjax.model.transformer import ForwardOutput, forward
from streamjax.stream.feed import feed_tokens, prefill, step, token_route
from streamjax.stream.generation import generate

__all__ = [
    "families", "ForwardOutput", "ModelConfig", "SinkCache", "feed_tokens", "forward", "generate", "init_cache",
    "load_hf_directory", "load_model", "prefill", "step", "token_route",
]  # fmt: skip
