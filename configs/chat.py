r"""Endless multi-turn chat with StreamingLLM (`python -m experiments.chat`).

Interactive (type your turns; /reset, /stats, /save NAME, /load NAME, /quit):

    python -m experiments.chat --config=configs/chat.py --workdir=/tmp/streamjax/chat

Scripted (one user turn per line of a .txt file, or {"role", "content"} records in a .jsonl file):

    python -m experiments.chat --config=configs/chat.py --workdir=/tmp/streamjax/chat_script \
        --config.script=turns.txt --config.window=508

Every field can be overridden on the command line (`--config.temperature=0`). Outputs, in the workdir:
`transcript.jsonl` (one record per turn) and `summary.json`. A conversation saved under a name and resumed on the
next run (kill it at any time; rerun the same command to go on):

    python -m experiments.chat --config=configs/chat.py --workdir=/tmp/streamjax/chat --config.session=mine

This file lists every field.
"""

import ml_collections


def get_config(arg=None):
    """The default: SmolLM2-135M-Instruct, StreamingLLM with 4 sinks + 1020 recent tokens."""
    del arg
    config = ml_collections.ConfigDict()
    # Model: "smollm2" (or "gemma3", a base model without a chat template), a .gguf file, a Hugging Face checkpoint
    # directory, or a hub id in the local cache.
    config.model = "smollm2"
    # The model's own chat template is used; a Jinja file here replaces it (for a model without one).
    config.chat_template = ""
    config.num_sinks = 4
    config.window = 1020
    # Sampling, as transformers' processors of these names; temperature 0 is greedy. SmolLM2's model card
    # suggests temperature 0.2 and top_p 0.9. Turn n draws with seed `seed + n`.
    config.temperature = 0.2
    config.top_k = 0
    config.top_p = 0.9
    config.min_p = 0.0
    config.repetition_penalty = 1.0  # over the token ids held in the cache
    config.seed = 0
    # A reply ends at the model's end-of-turn id, a stop string, or after max_new_tokens (-1: no limit).
    config.max_new_tokens = 256
    config.stop = ()  # e.g. ("\n\n",)
    config.system_prompt = ""  # "" keeps the template's own default (SmolLM2's template writes one)
    config.script = ""  # a .txt or .jsonl file of user turns; "" reads them from the terminal
    config.dtype = "float32"  # params and cache: float32, bfloat16 or float16
    config.mesh = ""  # e.g. "data=1,model=8" (see configs/ppl.py)
    # Several processes (hosts) over one mesh: "" (one process), "auto" (TPU pod slice, SLURM, Open MPI) or
    # "coordinator=HOST:PORT,num_processes=N,process_id=I" (see streamjax/runs/distributed.py, docs/sharding.md);
    # process 0 reads the user's turns and prints the replies.
    config.distributed = ""
    config.chunk_size = 256  # prompt tokens per forward pass
    config.block_size = 16  # decode steps per dispatch: the text appears in blocks of this many tokens
    # A saved conversation (workdir/sessions/NAME.session.safetensors) to resume if it exists; "" for none.
    # When set, the conversation is saved there after every turn, so a killed chat goes on from its last turn.
    config.session = ""
    return config
