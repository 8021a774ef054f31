r"""The streaming dialogue experiment (`python -m experiments.dialogue`, `experiments/dialogue.py`).

    python -m experiments.dialogue --config=configs/dialogue.py --workdir=/tmp/streamjax/dialogue

A conversation of `num_turns` turns made of Pride and Prejudice's first paragraphs (user message,
reference reply, ...), fed through SmolLM2's chat template into one cache per method, far past the
4 + 1020 cache and past SmolLM2's 8K positions. A quick run: --config.num_turns=40 --config.window=252.
"""

import ml_collections


def get_config(arg=None):
    """The default: SmolLM2-135M-Instruct, 300 turns, StreamingLLM 4 + 1020 against window and dense attention."""
    del arg
    config = ml_collections.ConfigDict()
    config.model = "smollm2"
    config.chat_template = ""  # "" uses the model's own; a Jinja file replaces it
    config.data = "austen"  # a corpus of `streamjax.files.corpora` whose paragraphs make the turns
    config.num_turns = 300
    config.max_message_chars = 600  # a longer paragraph is cut after its last sentence within this
    # Comma-separated, run in this order: streaming, window (no sinks, the last S + W tokens), dense (every
    # token, as far as min(dense_max_tokens, the model's positions) reaches).
    config.method = "streaming,window,dense"
    config.num_sinks = 4
    config.window = 1020
    config.dense_max_tokens = 8192
    config.chunk_size = 512
    # Turns at which each method generates a greedy reply (from the conversation so far) of at most
    # sample_tokens tokens, timing its decode and reading the process's memory.
    config.sample_turns = (3, 12, 50, 150, 299)
    config.sample_tokens = 48
    config.dtype = "float32"
    # Devices: "" is the default device. "data=1,model=8" (or "model=8") splits heads, MLP and vocabulary over
    # 8 devices (`streamjax.model.sharding`); data * model must be the device count (of every process).
    config.mesh = ""
    # Several processes (hosts) over one mesh: "" (one process), "auto" (TPU pod slice, SLURM, Open MPI) or
    # "coordinator=HOST:PORT,num_processes=N,process_id=I" (see streamjax/runs/distributed.py, docs/sharding.md).
    config.distributed = ""
    return config
