"""A perplexity run (`experiments.ppl.run`) that, at one chosen moment, touches a file and waits to be killed.

The child process of the SIGKILL tests in tests/test_ppl.py:

    python tests/killed_run.py CONFIG_JSON WORKDIR MOMENT READY_FILE

CONFIG_JSON holds fields of configs/ppl.py to override. MOMENT is one of
    segment:<method>:<n>  the n-th segment (call of `perplexity.score_next`, from 1) of the run of <method> is
                          about to be computed
    signal:<method>:<n>   as segment:<method>:<n>, but instead of sleeping until killed, the process waits for
                          the file READY_FILE + ".sent" (touched by the test after it sent a signal) and goes on
    computing:<method>:<n>  the n-th segment of the run of <method> is about to be computed: the process
                          touches READY_FILE and computes it at once, then writes READY_FILE + ".computed"
                          (JSON: `start` and `end`, time.monotonic() around the computation) and goes on
    summary:<run>         <run>/nll.npy is written, <run>/summary.json not yet
    save:<step>           orbax has written the checkpoint of <step> into its temporary directory and is
                          about to rename it into place
Once there (but for computing:), the process touches READY_FILE and sleeps until it is killed. A run that never
gets there finishes and exits 0, which the tests report as a failure. The run goes through the entry points' error
handling (`experiments.program.call`): a user error exits 1, a run stopped by a signal 128 + its number.
"""

from __future__ import annotations

import collections
import functools
import json
import pathlib
import sys
import time
import types

from orbax.checkpoint._src.path import atomicity

from configs import ppl as ppl_config
from experiments import ppl, program
from streamjax.runs import writes
from streamjax.stream import perplexity


def _wait_to_be_killed(ready: pathlib.Path) -> None:
    ready.touch()
    while True:
        time.sleep(60)


def _wait_for_the_signal(ready: pathlib.Path) -> None:
    ready.touch()
    sent = ready.with_name(ready.name + ".sent")
    for _ in range(1200):
        if sent.is_file():
            time.sleep(0.2)  # the signal was sent before the file: its handler has run by now
            return
        time.sleep(0.05)
    raise TimeoutError(f"{sent} never appeared")


def _stop_before_segment(method: str, number: int, ready: pathlib.Path, wait=_wait_to_be_killed) -> None:
    score_next, calls = perplexity.score_next, collections.Counter()

    @functools.wraps(score_next)
    def counted(params, model_config, tokens, spec, *args, **kwargs):
        calls[spec.method] += 1
        if spec.method == method and calls[method] == number:
            wait(ready)
        return score_next(params, model_config, tokens, spec, *args, **kwargs)

    perplexity.score_next = counted


def _time_segment(method: str, number: int, ready: pathlib.Path) -> None:
    score_next, calls = perplexity.score_next, collections.Counter()

    @functools.wraps(score_next)
    def timed(params, model_config, tokens, spec, *args, **kwargs):
        calls[spec.method] += 1
        if spec.method != method or calls[method] != number:
            return score_next(params, model_config, tokens, spec, *args, **kwargs)
        start = time.monotonic()
        ready.touch()
        result = score_next(params, model_config, tokens, spec, *args, **kwargs)
        end = time.monotonic()
        ready.with_name(ready.name + ".computed").write_text(json.dumps({"start": start, "end": end}))
        return result

    perplexity.score_next = timed


def _stop_before_summary(summary: pathlib.Path, ready: pathlib.Path) -> None:
    write_json = writes.write_json

    def write(path: pathlib.Path, value) -> None:
        if path == summary:
            assert (path.parent / "nll.npy").is_file()
            _wait_to_be_killed(ready)
        write_json(path, value)

    writes.write_json = write


def _stop_before_rename(step: int, ready: pathlib.Path) -> None:
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def rename(self) -> None:
        if self.get_final().name == str(step):
            assert self.get().is_dir() and self.get() != self.get_final()
            _wait_to_be_killed(ready)
        await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = rename


def main(config_json: str, workdir: str, moment: str, ready_file: str) -> None:
    config = ppl_config.get_config()
    config.update(json.loads(config_json))
    ready = pathlib.Path(ready_file)
    kind, *where = moment.split(":")
    if kind == "segment":
        _stop_before_segment(where[0], int(where[1]), ready)
    elif kind == "signal":
        _stop_before_segment(where[0], int(where[1]), ready, wait=_wait_for_the_signal)
    elif kind == "computing":
        _time_segment(where[0], int(where[1]), ready)
    elif kind == "summary":
        _stop_before_summary(pathlib.Path(workdir).resolve() / where[0] / "summary.json", ready)
    elif kind == "save":
        _stop_before_rename(int(where[0]), ready)
    else:
        raise ValueError(f"unknown moment {moment!r}")
    holder = types.SimpleNamespace
    program.call([sys.argv[0]], functools.partial(ppl.run, progress=False), holder(value=config), holder(value=workdir))


if __name__ == "__main__":
    main(*sys.argv[1:])
