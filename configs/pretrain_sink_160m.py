r"""Pre-training with attention sinks at the paper's scale (Table 3): 160M-parameter models, context 2048.

Sized for accelerators (a TPU v2-8 or a GPU), computing in bfloat16 with float32 master weights and optimizer
state; not run here.

    python -m experiments.pretrain --config=configs/pretrain_sink_160m.py --workdir=/tmp/streamjax/pretrain_160m \
        --config.data=/path/to/pg19_or_other_text_dir --config.mesh=data=8

On several hosts, the same command runs once on each with `--config.distributed=auto` (or
`coordinator=HOST:PORT,num_processes=N,process_id=I`: `config.distributed`, inherited from
`configs/pretrain_sink.py`) and a mesh over every host's devices, e.g. `--config.mesh=data=32` for 4 hosts of 8.

The shape is Pythia-160M's (hidden 768, 12 layers, 12 heads, a 50,304-entry vocabulary, an untied
head, 2048-token samples: 162M parameters) in streamjax's Llama architecture (RMSNorm, RoPE on every
head dimension, a SwiGLU MLP whose 2048 hidden units give the parameter count of Pythia's 3072-unit
GELU MLP); the paper trained GPT-NeoX Pythia models on the Pile. The caches evaluated are the paper's:
0+1024, 1+1023, 2+1022, 4+1020. Austen (the default data) is about a million tokens, far fewer than a
160M model wants: point `data` at a larger corpus.
"""

from configs import pretrain_sink


def get_config(arg=None):
    """The default config with the paper's model size, sample length and caches."""
    config = pretrain_sink.get_config(arg)
    config.vocab_size = 50304
    config.model.hidden_size = 768
    config.model.num_layers = 12
    config.model.num_heads = 12
    config.model.num_kv_heads = 12
    config.model.intermediate_size = 2048
    config.model.tie_embeddings = False  # as Pythia's
    config.sample_length = 2048
    config.batch_size = 64
    config.steps = 20000
    config.learning_rate = 6e-4
    config.warmup_steps = 1000
    config.eval_cache = 1024
    config.eval_tokens = 16384
    config.evaluate_every = 1000
    config.heldout_samples = 64
    config.chunk_size = 512
    config.checkpoint_every = 500
    config.dtype = "bfloat16"
    return config
