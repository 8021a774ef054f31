r"""Efficiency benchmark (the paper's Figure 10, route throughput, long streams, machine limits).

Command (from the repository root), SmolLM2-135M from its GGUF in float32, sized for a small CPU:

    python -m experiments.efficiency --config=configs/efficiency.py --workdir=/tmp/streamjax/efficiency

A tiny random model and small sizes, for a quick end-to-end check (seconds, any backend):

    python -m experiments.efficiency --config=configs/efficiency.py:small=True --workdir=/tmp/streamjax/eff_small

Any field can be overridden, e.g. `--config.repeats=9 --config.cache_sizes='(512,1024)'`. Outputs are
described in `experiments/efficiency.py`. This file lists every field; `configs/efficiency_llama2_7b.py` and
`configs/efficiency_gemma3.py` start from it.
"""

import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
    """The default: SmolLM2-135M (float32), caches 256..4096, StreamingLLM at 4 + 1020 for routes and streams."""
    options = parse_arg(arg, small=False)
    config = ml_collections.ConfigDict()
    # Model: "smollm2" or "gemma3" (GGUFs of `streamjax.files.assets`), a .gguf file, a checkpoint directory, or
    # "random": weights drawn at random for the ModelConfig fields in `random_model` (nothing loaded).
    config.model = "smollm2"
    config.random_model = ml_collections.ConfigDict()
    config.dtype = "float32"  # params and cache: float32, bfloat16 or float16
    config.seed = 0
    # Decode latency and memory against cache size: a comma-separated subset of
    # streaming, dense and recompute (sliding window with re-computation), measured in this order at each size.
    config.methods = "streaming,dense,recompute"
    config.cache_sizes = (256, 512, 1024, 2048, 4096)
    config.num_sinks = 4  # of every StreamingLLM cache; its window is the rest of the cache size
    config.warmup = 2  # untimed calls before timing (compilation)
    config.repeats = 7  # timed calls (decode steps, bandwidth and matmul kernels); the median is reported
    config.recompute_repeats = 2  # timed dense forwards over the window (minutes each at 4096 on a small CPU)
    config.recompute_warmup = 1  # compilation happens before timing; one call warms the allocator
    config.target_cache_size = 1024  # the decode whose fraction of the bandwidth limit is a target
    # Evaluation routes, StreamingLLM at num_sinks + route_window, over random token ids.
    config.route_window = 1020
    config.route_chunk_size = 512
    config.chunk_route_tokens = 2048  # predictions timed on the chunk route (a multiple of route_chunk_size)
    config.token_route_tokens = 128  # predictions timed on the token route (each is one forward pass)
    # Predictions on which the two routes' NLL are compared (the token route runs once over them, untimed):
    # more than num_sinks + route_window + route_chunk_size, so the cache has evicted and chunks followed chunks.
    config.route_compare_tokens = 2048
    config.route_repeats = 2
    # Generation (`streamjax.stream.generation`, greedy) on a full num_sinks + route_window cache: a decode block of
    # generation_block steps against as many bare jitted steps (batch 1), and batch generation_batch against batch 1,
    # timed alternately for generation_rounds rounds; and from the long stream's early and late positions.
    config.generation_block = 32
    config.generation_rounds = 5
    config.generation_batch = 8
    # Long streams (cache num_sinks + route_window): decode cost at the early vs the late position,
    # peak memory after the two memory positions (in increasing order).
    config.early_position = 1_000
    config.late_position = 100_000
    config.memory_positions = (10_000, 100_000)
    # True: stream random tokens there with the chunk route (100k SmolLM2 tokens: about 6 minutes on a 2-core CPU).
    # False: set the cache to the exact state after that many tokens (random keys and values): quick, but the same
    # shapes and program at every position, so the late/early ratios then cannot show a growing cost.
    config.long_stream_streamed = True
    config.stream_chunk_size = 512
    config.long_stream_rounds = 7  # early and late decode costs timed alternately this many times (drift hits both)
    # Optional peer (imports torch): transformers' own greedy generation of the same model file, batch 1, its default
    # cache (sliding-window layers where the model has them), after a prompt of num_sinks + route_window random tokens;
    # the gaps between peer_new_tokens generated tokens are timed, in peer_rounds calls after one untimed call.
    config.transformers_peer = False
    config.peer_new_tokens = 33  # 32 gaps, as many steps as generation_block
    config.peer_rounds = 3
    # Machine limits: bytes of the bandwidth kernels, size of the square matmul.
    config.bandwidth_bytes = 1 << 30  # well above the last-level cache
    config.bandwidth_repeats = 3  # of the read-bandwidth sum timed just before each decode row
    config.matmul_size = 2048
    # Devices: "" measures everything above on the default device. A mesh such as "data=2,model=4" (data * model
    # must be the device count of all processes; `streamjax.model.sharding`) measures instead one decode step and one
    # training step of the model laid over it: step time, and the collectives XLA put in each (time, bytes, whether
    # they cross processes), written to efficiency_mesh.json.
    config.mesh = ""
    # Several processes (hosts) over one mesh: "" (one process), "auto" (TPU pod slice, SLURM, Open MPI) or
    # "coordinator=HOST:PORT,num_processes=N,process_id=I" (see streamjax/runs/distributed.py, docs/sharding.md).
    config.distributed = ""
    config.mesh_cache_size = 1024  # S + W of the decode step's full StreamingLLM cache (num_sinks of them sinks)
    config.mesh_decode_batch = 1  # streams decoded together (split over "data" where the axis divides them)
    config.mesh_train_batch = 8  # samples per training step (a multiple of the data axis), from random text
    config.mesh_train_length = 256  # tokens per sample
    config.mesh_train_tokens = 65_536  # random text the samples are drawn from
    config.mesh_traced_steps = 5  # steps run under jax.profiler, whose trace times each collective
    if options.small:
        _make_small(config)
    return config


def _make_small(config: ml_collections.ConfigDict) -> None:
    """A 2-layer random Llama and sizes that run end to end in well under a minute on a CPU."""
    config.model = "random"
    config.random_model = ml_collections.ConfigDict(
        {
            "family": "llama", "vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 128, "norm_eps": 1e-5, "tie_embeddings": True,
            "max_position_embeddings": 4096,
        }
    )  # fmt: skip
    config.cache_sizes = (16, 32, 64)
    config.target_cache_size = 32
    config.warmup, config.repeats, config.recompute_repeats, config.route_repeats = 1, 3, 2, 1
    config.route_window, config.route_chunk_size = 28, 16
    config.chunk_route_tokens, config.token_route_tokens, config.route_compare_tokens = 64, 32, 64
    config.early_position, config.late_position, config.memory_positions = 100, 3_000, (1_000, 3_000)
    config.stream_chunk_size = 256
    config.generation_block, config.generation_rounds = 8, 2
    config.bandwidth_bytes, config.matmul_size = 1 << 24, 256
    config.mesh_cache_size, config.mesh_train_batch, config.mesh_train_length = 64, 8, 32
    config.mesh_train_tokens, config.mesh_traced_steps = 4096, 3
