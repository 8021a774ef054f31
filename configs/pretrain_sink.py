r"""Pre-training with attention sinks (the paper's Table 3), at a size this project's 2-core CPU trains.

Command (from the repository root):

    python -m experiments.pretrain --config=configs/pretrain_sink.py --workdir=/tmp/streamjax/pretrain

Some variants only, or a longer run:

    python -m experiments.pretrain --config=configs/pretrain_sink.py --workdir=/tmp/streamjax/pretrain_long \
        --config.variants=vanilla,sink_token --config.steps=1000

For each seed of `seeds` it trains each variant (vanilla, sink_token, zero_sink, sink_logit:
`experiments/pretrain.py`) from the same random init (every shared param bitwise equal) on the same text
windows in the same order, then streams the held-out text through each at the cache layouts 0+W, 1+(W-1),
2+(W-2), 4+(W-4); the tables give each seed and the mean and range over seeds. A killed run resumes from
its checkpoints when started again with the same --workdir. The paper's scale is
`configs/pretrain_sink_160m.py`.
"""

import ml_collections


def get_config(arg=None):
    """The default: a 1.4M-parameter Llama on Austen, 3 seeds x 4 variants x 250 steps of 16 x 128 tokens,
    sized to finish in about 75 minutes on this project's 2 CPU cores while other jobs share them: run at
    commit f17279b, it took 52 minutes of wall time (03:34 to 04:27 UTC, load averages of about 10)."""
    del arg
    config = ml_collections.ConfigDict()
    # Text: a corpus spec of `streamjax.files.corpora` ("austen", "mobydick", a .txt file or a directory).
    config.data = "austen"
    # The last share of the text (cut at a paragraph break) is held out: never trained on.
    config.heldout_fraction = 0.05
    # Entries of the byte-level BPE tokenizer trained on the training text (with <|endoftext|>, <sink>).
    config.vocab_size = 4096
    # The model: Llama-shaped (RMSNorm, RoPE, SwiGLU), head_dim = hidden_size / num_heads.
    config.model = ml_collections.ConfigDict()
    config.model.hidden_size = 128
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.num_kv_heads = 4
    config.model.intermediate_size = 384
    config.model.rope_theta = 10000.0
    config.model.tie_embeddings = True
    # Training: samples of `sample_length` tokens (also the model's positions), AdamW with a linear
    # warmup and a cosine decay to final_learning_rate_ratio * learning_rate, global-norm clipping.
    config.sample_length = 128
    config.batch_size = 16
    config.steps = 250
    config.learning_rate = 3e-3
    config.warmup_steps = 25
    config.final_learning_rate_ratio = 0.1
    config.weight_decay = 0.1
    config.clip_norm = 1.0
    # Each seed (its init and its samples) trains every variant; the tables give the mean and range over seeds.
    config.seeds = "0,1,2"
    # Comma-separated subset of vanilla, sink_token, zero_sink, sink_logit.
    config.variants = "vanilla,sink_token,zero_sink,sink_logit"
    # Evaluation: the first eval_tokens held-out tokens streamed through a cache of eval_cache = S + W
    # slots, for each S of eval_sinks (0: window attention), every evaluate_every steps and at the end;
    # the held-out loss over heldout_samples training-shaped samples.
    config.eval_cache = 64
    config.eval_sinks = "0,1,2,4"
    config.eval_tokens = 2048
    config.evaluate_every = 50
    config.heldout_samples = 64
    config.chunk_size = 64
    # Checkpoint the training state every this many steps (a restart resumes bitwise).
    config.checkpoint_every = 50
    # "" runs on the default device; e.g. "data=8" or "data=4,model=2" (see streamjax/model/sharding.py).
    config.mesh = ""
    # Several processes (hosts) over one mesh: "" (one process), "auto" (TPU pod slice, SLURM, Open MPI) or
    # "coordinator=HOST:PORT,num_processes=N,process_id=I" (see streamjax/runs/distributed.py, docs/sharding.md);
    # a distributed run needs a mesh over every process's devices, and resumes only with as many processes.
    config.distributed = ""
    # The dtype of the forward and backward pass: "float32" or "bfloat16" (float32 master weights and optimizer
    # state either way; models are saved in float32).
    config.dtype = "float32"
    # Repeats of the [2048 x 2048] matmul that the training throughput is compared with.
    config.matmul_repeats = 5
    return config
