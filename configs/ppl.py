r"""Streaming perplexity: per-token NLL of one text under one or more methods, resumable.

Command (from the repository root):

    python -m experiments.ppl --config=configs/ppl.py --workdir=/tmp/streamjax/ppl

By default it compares dense, window and StreamingLLM attention (one plot line and one table row
each) on the first 4096 tokens; other methods or lengths on the command line:

    python -m experiments.ppl --config=configs/ppl.py --workdir=/tmp/streamjax/ppl_methods \
        --config.method=dense,window,recompute,streaming --config.num_tokens=2048

On 8 devices (a TPU v2-8, or CPUs forced with XLA_FLAGS=--xla_force_host_platform_device_count=8),
one model split 8 ways, loaded straight onto its shards:

    python -m experiments.ppl --config=configs/ppl.py --workdir=/tmp/streamjax/ppl_mesh \
        --config.mesh=data=1,model=8 --config.dtype=bfloat16

A killed run resumes from its last checkpoint when started again with the same --workdir; a
finished one is only reported. The workdir layout is described in `experiments/ppl.py`.
This file lists every field; the other `configs/ppl_*.py` start from it.
"""

import ml_collections


def get_config(arg=None):
    """The default: SmolLM2-135M, Pride and Prejudice, StreamingLLM with 4 sinks + 1020 recent tokens."""
    del arg
    config = ml_collections.ConfigDict()
    # Model: "smollm2" or "gemma3" (the SmolLM2-135M-Instruct and Gemma 3 270M GGUFs of `streamjax.files.assets`),
    # a .gguf file, a Hugging Face checkpoint directory (with tokenizer files), or a hub id in the local HF cache.
    config.model = "smollm2"
    # Text: "austen" (six novels, Pride and Prejudice first), "mobydick", a .txt file or a directory.
    config.data = "austen"
    # Comma-separated methods, each one run: dense, window, streaming, recompute (recompute costs a
    # forward pass over S + W tokens per prediction: leave it to accelerators).
    config.method = "dense,window,streaming"
    # Cache budget: S sinks + W recent tokens. `window` attention keeps the last S + W tokens and no
    # sinks; `recompute` re-reads the last S + W tokens for every prediction; `dense` keeps everything.
    config.num_sinks = 4
    config.window = 1020
    # A hybrid model's sliding layers (Gemma 3) keep the model's own window, whatever the method, and
    # this many sinks besides (0: the model's own sliding attention). S + W above is the full layers' cache.
    config.sliding_sinks = 0
    # The first num_tokens tokens of the text are read; num_tokens - 1 of them are predicted.
    config.num_tokens = 4096
    # Start the stream this many text tokens in (after the BOS, which stays first): a fresh stream mid-text.
    config.skip_tokens = 0
    # "chunk": chunk_size tokens per forward pass (exact); "token": one token per step in a lax.scan.
    # Runs advance (and report progress) in segments of chunk_size predictions.
    config.route = "chunk"
    config.chunk_size = 512
    config.dtype = "float32"  # params and cache: float32, bfloat16 or float16
    # Devices: "" is the default device, nothing to set up. "data=1,model=8" (or "model=8") splits heads,
    # MLP and vocabulary over 8 devices (`streamjax.model.sharding`); data * model must be the device count.
    # A run resumes only on the mesh it started on: a split changes float rounding in the last bits.
    config.mesh = ""
    # Several processes (hosts) over one mesh: "" (one process), "auto" (TPU pod slice, SLURM, Open MPI) or
    # "coordinator=HOST:PORT,num_processes=N,process_id=I" (see streamjax/runs/distributed.py, docs/sharding.md).
    config.distributed = ""
    # Save a checkpoint every this many predictions (a multiple of chunk_size); 0: never.
    config.checkpoint_every = 2048
    # Text fed before the data, after the BOS if the tokenizer adds one (its tokens without special tokens,
    # repeated sink_prefix_repeat times), so that it fills the sinks; its own predictions are not scored,
    # nor (without a BOS) that of the first text token: the scored targets are those of a run without it.
    config.sink_prefix = ""
    config.sink_prefix_repeat = 1
    # Optional list of dicts, each a variant of the fields (name, method, num_sinks, window, num_tokens
    # (at most config.num_tokens), skip_tokens, sink_prefix, sink_prefix_repeat, sliding_sinks); each method
    # of the variant's `method` is run, as run "<method>-<name>". Empty: one variant made of the fields
    # above, runs named by the method alone.
    config.variants = []
    # log_ppl.png: log PPL as the cumulative mean NLL and, beside it, the mean of the last plot_window.
    config.plot_window = 256
    # segments.json / segments.png: log PPL, ms per token and resident memory every segment_tokens predictions.
    config.segment_tokens = 1024
    return config
