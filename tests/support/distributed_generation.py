"""One generation of a batch of streams across the processes of a `jax.distributed` run (a child script).

    python tests/support/distributed_generation.py SPEC OUT.json MESH [MESH ...]

Every process builds the same tiny random Llama (`CASE`, seeded alike), and for each MESH (which spans the
processes) lays it and a cache of one stream per prompt over the mesh and generates from `PROMPTS`, greedily
and by seeded sampling, past the cache's capacity; process 0 writes each stream's tokens and reasons to
OUT.json as {mesh: {sampling: {"tokens": [...], "reasons": [...]}}}.
`reference()` is the same generation of each stream alone, on one device of the calling process.
"""

from __future__ import annotations

import json
import sys

CASE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 8, "num_hidden_layers": 2}  # fmt: skip
PROMPTS = [[3, 17, 5, 9, 60, 2, 11], [40], [8, 8, 1, 33, 21], [12, 50, 7]]
MAX_NEW_TOKENS = [12, 9, 12, 10]  # streams finish at different steps
NUM_SINKS, WINDOW, CHUNK, BLOCK = 2, 6, 4, 5  # every stream passes its 8 slots: 1 + 9 tokens at least
SAMPLING = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": [0.8, 1.0, 1.3, 0.7], "top_k": [0, 8, 0, 5], "top_p": [1.0, 0.9, 0.8, 1.0],
                "seed": [1, 2, 3, 4]},
}  # fmt: skip


def model():
    """(config, params) of the tiny random Llama, the same in every process."""
    from support.models import random_hf_llama, to_streamjax

    return to_streamjax(random_hf_llama(seed=3, **CASE))


def settings_of(name: str, streams: list[int]):
    """The sampling settings `name` of the given streams (indices into PROMPTS)."""
    from streamjax.stream import sampling

    values = {key: [value[i] for i in streams] if isinstance(value, list) else value
              for key, value in SAMPLING[name].items()}  # fmt: skip
    return sampling.sampling_settings(len(streams), **values)


def generation(params, config, streams: list[int], name: str, mesh=None) -> dict:
    """{"tokens": one list per stream, "reasons": ...} of generating `streams` together (on `mesh` if given)."""
    from streamjax import init_cache
    from streamjax.model import sharding
    from streamjax.stream import generation as generation_lib
    from streamjax.stream import stopping

    cache = init_cache(config, len(streams), NUM_SINKS, WINDOW)
    if mesh is not None:
        cache = sharding.shard_cache(cache, mesh)
    stops = stopping.stop_conditions(len(streams), max_new_tokens=[MAX_NEW_TOKENS[i] for i in streams])
    result = generation_lib.generate(
        params, cache, [PROMPTS[i] for i in streams], config, settings_of(name, streams), stops,
        chunk_size=CHUNK, block_size=BLOCK,
    )  # fmt: skip
    return {"tokens": [t.tolist() for t in result.tokens], "reasons": result.reasons}


def reference() -> dict:
    """Each stream generated alone, on this process's default device: {name: {"tokens", "reasons"}}."""
    config, params = model()
    out = {}
    for name in SAMPLING:
        alone = [generation(params, config, [i], name) for i in range(len(PROMPTS))]
        out[name] = {key: [one[key][0] for one in alone] for key in ("tokens", "reasons")}
    return out


def main(spec: str, path: str, *meshes: str) -> None:
    from streamjax.model import families, sharding
    from streamjax.runs import distributed

    distributed.initialize(spec)
    config, params = model()
    out = {}
    for mesh_spec in meshes:
        mesh = sharding.config_mesh(mesh_spec)
        sharded = sharding.shard_params(params, families.param_specs(config), mesh)
        streams = list(range(len(PROMPTS)))
        out[mesh_spec] = {name: generation(sharded, config, streams, name, mesh) for name in SAMPLING}
    if distributed.is_writer():
        with open(path, "w") as file:
            json.dump(out, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
