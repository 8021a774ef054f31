r"""Load test of the server (`python -m experiments.serve_load`): loopback, bounded, greedy.

    python -m experiments.serve_load --config=configs/serve_load.py --workdir=/tmp/streamjax/serve_load

It starts `python -m experiments.serve` (configs/serve.py, port 0) as a child process, drives it over HTTP
and writes `workdir/serve_load.json` and `workdir/results.md`; the server's own workdir is
`workdir/server` (and `workdir/server_one_slot` for the one-slot baseline). The default took 1,020 s
on 2 shared CPU cores (docs/serve). Every field can be overridden (`--config.long_turns=50`). This file
lists every field.
"""

import ml_collections


def get_config(arg=None):
    """The default: SmolLM2-135M-Instruct on an 8-slot server, 1, 4 and 8 sessions, 2 sessions of 200 turns."""
    del arg
    config = ml_collections.ConfigDict()
    # The server: the model as configs/serve.py takes it, its chat template file ("": the model's own).
    config.model = "smollm2"
    config.chat_template = ""
    config.dtype = "float32"
    config.num_sinks = 4
    config.window = 1020
    config.slots = 8
    config.block_size = 16  # the server's decode steps per dispatch
    # Prompts: user turns of `sentences_per_turn` consecutive sentences of this corpus (streamjax.files.corpora).
    config.corpus = "austen"
    config.sentences_per_turn = 2
    # Concurrency phases: for each count, that many sessions at once, `turns` turns each of `max_tokens`.
    config.concurrency = (1, 4, 8)
    config.turns = 3
    config.max_tokens = 32
    # Long sessions: `long_sessions` at once, `long_turns` turns each of `long_max_tokens`.
    config.long_sessions = 2
    config.long_turns = 200
    config.long_max_tokens = 16  # one decode block of the server
    # One session on a server with one slot (its decode program is batch 1), as the batch-1 reference.
    config.one_slot_baseline = True
    # The batched-decode factor the server is held to: generation.batch_speedup of this efficiency run.
    config.efficiency_json = "docs/efficiency/efficiency.json"
    # transformers' generate of the same model file and the first prompt (torch imported only then).
    config.transformers_peer = True
    config.peer_rounds = 3  # timed calls, after one untimed
    config.server_start_timeout_s = 900  # loading the model and listening
    config.request_timeout_s = 900
    return config
