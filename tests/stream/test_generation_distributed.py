"""Generation across processes: a batch of 4 streams split over 2 `jax.distributed` processes (4 CPU devices
each, one mesh over all 8) gives each stream exactly what it gives alone on one device.

The two processes run `support/distributed_generation.py` while this process computes the reference, each
stream generated alone on its default device. Greedy and seeded sampling, prompts of different lengths,
streams that stop at different steps, and every stream past its cache's capacity (so sinks and eviction
are at work). On "data=2,model=4" the streams are split over the processes (2 each) and the 4 heads over
each process's devices; "data=4,model=2" (2 streams per process, 1 per device pair) passed as well when
tried, and is left out to keep the test under a minute.
"""

from __future__ import annotations

import json
import sys

import pytest

from support import distributed_generation, processes

MESH = "data=2,model=4"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    """(what the 2 processes generated, each stream alone here), both {sampling: {"tokens", "reasons"}}."""
    path = tmp_path_factory.mktemp("generation") / "out.json"
    script = str(processes.REPO / "tests" / "support" / "distributed_generation.py")
    children = processes.start(lambda spec: [sys.executable, script, spec, str(path), MESH])
    alone = distributed_generation.reference()
    processes.assert_succeeded(processes.wait(children, timeout=180))
    return json.loads(path.read_text())[MESH], alone


@pytest.mark.parametrize("sampling", list(distributed_generation.SAMPLING))
def test_each_stream_of_a_batch_split_over_processes_gives_what_it_gives_alone(runs, sampling):
    together, alone = runs[0][sampling], runs[1][sampling]
    assert together["tokens"] == alone["tokens"]
    assert together["reasons"] == alone["reasons"] == ["max_new_tokens"] * len(distributed_generation.PROMPTS)
    assert [len(tokens) for tokens in alone["tokens"]] == distributed_generation.MAX_NEW_TOKENS


def test_the_streams_differ_so_a_mixup_would_show(runs):
    for sampling in distributed_generation.SAMPLING:
        tokens = runs[1][sampling]["tokens"]
        assert len({tuple(stream) for stream in tokens}) == len(tokens)
