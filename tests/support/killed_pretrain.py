"""A pre-training run (`experiments.pretrain.run`) that, at one chosen moment, touches a file and waits to be killed.

The child process of the SIGKILL tests in tests/test_pretrain.py:

    python tests/killed_pretrain.py CONFIG_JSON WORKDIR MOMENT READY_FILE

CONFIG_JSON holds fields of configs/pretrain_sink.py to override (nested as `{"model": {...}}`; with a
"distributed" spec the child is one process of a distributed run, tests/experiments/test_pretrain_distributed.py).
MOMENT is
    step:<n>     the n-th training step (from 1) of this process is about to run
    running:<n>  as step:<n>, but the process only touches READY_FILE and goes on training (the test
                 sends it a signal while it trains)
    save:<step>  orbax has written the training state of <step> into its temporary directory and is about
                 to rename it into place
    export       training has ended and the trained model is about to be written
Once there (but for running:), the process touches READY_FILE and sleeps until it is killed; a run that never gets there
finishes and exits 0, which the tests report as a failure.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import types

from configs import pretrain_sink
from experiments import pretrain, program
from streamjax import training
from streamjax.files import export
from support.killed_run import _stop_before_rename, _wait_to_be_killed


def _stop_before_step(number: int, ready: pathlib.Path, wait=_wait_to_be_killed) -> None:
    make = training.make_train_step
    calls = [0]

    def counted_make(*args, **kwargs):
        step = make(*args, **kwargs)

        def counted(*step_args):
            calls[0] += 1
            if calls[0] == number:
                wait(ready)
            return step(*step_args)

        return counted

    training.make_train_step = counted_make


def _stop_before_export(ready: pathlib.Path) -> None:
    def stop(*args, **kwargs):
        _wait_to_be_killed(ready)

    export.save_model = stop


def main(config_json: str, workdir: str, moment: str, ready_file: str) -> None:
    config = pretrain_sink.get_config()
    config.update_from_flattened_dict(json.loads(config_json))
    ready = pathlib.Path(ready_file)
    kind, *where = moment.split(":")
    if kind == "step":
        _stop_before_step(int(where[0]), ready)
    elif kind == "running":
        _stop_before_step(int(where[0]), ready, wait=pathlib.Path.touch)
    elif kind == "save":
        _stop_before_rename(int(where[0]), ready)
    elif kind == "export":
        _stop_before_export(ready)
    else:
        raise ValueError(f"unknown moment {moment!r}")
    holder = types.SimpleNamespace
    program.call(
        [sys.argv[0]], functools.partial(pretrain.run, progress=False), holder(value=config), holder(value=workdir)
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
