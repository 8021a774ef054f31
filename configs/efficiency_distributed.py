r"""Efficiency on a mesh over two processes: what the collectives of a decode step and a training step cost.

The tiny random Llama of `configs/efficiency.py:small=True`, one model split over 8 devices of 2 processes
(4 CPU devices each, collectives over gloo). On one machine, in two shells (from the repository root):

    JAX_NUM_CPU_DEVICES=4 python -m experiments.efficiency --config=configs/efficiency_distributed.py \
        --workdir=/tmp/streamjax/eff_distributed \
        --config.distributed=coordinator=localhost:8476,num_processes=2,process_id=0
    JAX_NUM_CPU_DEVICES=4 python -m experiments.efficiency --config=configs/efficiency_distributed.py \
        --workdir=/tmp/streamjax/eff_distributed \
        --config.distributed=coordinator=localhost:8476,num_processes=2,process_id=1

On a cluster, the same command on every host with `--config.distributed=auto` and a mesh over all their
devices (docs/sharding.md). Process 0 writes `efficiency_mesh.json`. Fields are documented in
`configs/efficiency.py`.
"""

from configs import efficiency


def get_config(arg=None):
    """The small model on `data=1,model=8`: its MLP and vocabulary split over both processes' devices."""
    del arg
    config = efficiency.get_config("small=True")
    config.mesh = "data=1,model=8"
    config.mesh_decode_batch = 1
    config.repeats, config.warmup = 7, 2
    config.mesh_traced_steps = 5
    return config
