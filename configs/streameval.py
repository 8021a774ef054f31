r"""StreamEval (`python -m experiments.streameval`, `experiments/streameval.py`): questions answered inside
an endless stream of numbered lines (the paper's Figure 9 and Table 7).

    python -m experiments.streameval --config=configs/streameval.py --workdir=/tmp/streamjax/streameval

Accuracy against the answer distance for StreamingLLM at two caches (Table 7):

    python -m experiments.streameval --config=configs/streameval.py --workdir=/tmp/streamjax/streameval_distance \
        --config.method=streaming --config.window=252,1020 --config.answer_distance=5,10,20,40,60,80 \
        --config.num_lines=160 --config.num_samples=1
"""

import ml_collections


def get_config(arg=None):
    """The default: SmolLM2-135M-Instruct, 600 lines (past 8K tokens), dense, window and StreamingLLM at 4 + 1020."""
    del arg
    config = ml_collections.ConfigDict()
    config.model = "smollm2"
    config.chat_template = ""  # "" uses the model's own; a Jinja file replaces it
    # Comma-separated: dense (every token, until the stream reaches min(dense_max_tokens, the model's
    # positions)), window (no sinks, the last num_sinks + window tokens), streaming (StreamingLLM).
    config.method = "dense,window,streaming"
    config.num_sinks = 4
    config.window = "1020"  # an int, or comma-separated ints: one run per window
    config.num_lines = 600
    config.query_every = 10  # a question after every 10th line ...
    config.answer_distance = "20"  # ... about the line this many lines back (comma-separated: one run each)
    config.num_samples = 2  # streams per run, seeds seed, seed + 1, ...
    config.seed = 0
    config.dense_max_tokens = 8192
    config.dtype = "float32"
    # Devices: "" is the default device. "data=1,model=8" (or "model=8") splits heads, MLP and vocabulary over
    # 8 devices (`streamjax.model.sharding`); data * model must be the device count (of every process).
    config.mesh = ""
    # Several processes (hosts) over one mesh: "" (one process), "auto" (TPU pod slice, SLURM, Open MPI) or
    # "coordinator=HOST:PORT,num_processes=N,process_id=I" (see streamjax/runs/distributed.py, docs/sharding.md).
    config.distributed = ""
    return config
