r"""An OpenAI-compatible server of streaming conversations (`python -m experiments.serve`).

    python -m experiments.serve --config=configs/serve.py --workdir=/tmp/streamjax/serve

It listens on http://127.0.0.1:8000/v1 (OpenAI's chat and text completions, models) with /health and
/metrics beside it, and writes `workdir/server.json` ({"host", "port", "pid", "model"}) once listening;
sessions are saved in `workdir/sessions`. SIGTERM or Ctrl-C saves the sessions and stops it. Any other host
than a loopback address needs an API key:

    python -m experiments.serve --config=configs/serve.py --workdir=/tmp/streamjax/serve \
        --config.host=0.0.0.0 --config.api_key="$(openssl rand -hex 16)"

Every field can be overridden on the command line (`--config.slots=4`). This file lists every field.
"""

import ml_collections


def get_config(arg=None):
    """The default: SmolLM2-135M-Instruct, 8 slots, each a StreamingLLM cache of 4 sinks + 1020 recent tokens."""
    del arg
    config = ml_collections.ConfigDict()
    # Model: "smollm2", a .gguf file, a Hugging Face checkpoint directory, or a hub id in the local cache;
    # its chat template is used, or the Jinja file in chat_template (for a model without one).
    config.model = "smollm2"
    config.chat_template = ""
    config.dtype = "float32"  # params and caches: float32, bfloat16 or float16
    config.num_sinks = 4
    config.window = 1020
    config.slots = 8  # streams decoded together by one program: requests served at once
    config.host = "127.0.0.1"  # a non-loopback host needs an api_key
    config.port = 8000  # 0: a free port (read it from workdir/server.json)
    config.api_key = ""  # when set, /v1 routes want `Authorization: Bearer <api_key>`
    config.max_body_bytes = 2**20  # a larger request body is refused (413)
    # Replies: max_tokens when a request gives none, and the most a request may ask for.
    config.default_max_tokens = 256
    config.max_tokens_limit = 4096
    config.seed = 0  # the sampling seed of a request that gives none
    config.chunk_size = 64  # prompt tokens per forward pass: a turn's prompt is short, and a chunk is computed whole
    config.block_size = 16  # decode steps per dispatch: a streamed reply comes in blocks of this many tokens
    config.max_stop_strings = 4  # as OpenAI's API
    return config
