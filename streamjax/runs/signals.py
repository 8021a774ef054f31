"""SIGTERM and SIGINT (preemption, Ctrl-C) during a long job: save at the next safe point, then stop."""

from __future__ import annotations

import signal
import threading
from typing import Any

from streamjax.runs import distributed, log


class Interrupted(Exception):
    """A run stopped by SIGTERM or SIGINT after saving its state; `exit_code` is 128 + the signal's number."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class StopRequests:
    """Catches SIGTERM and SIGINT (preemption, Ctrl-C) while runs compute: the first one asks the run to save
    its state at the end of the segment it is computing and stop (`Interrupted`); a second SIGINT stops at
    once (KeyboardInterrupt, as a kill: the last checkpoint stays). Handlers are only installed from the
    main thread (Python's rule), and the previous ones come back on exit. Python runs a handler in the main
    thread between bytecodes, so a signal that comes while XLA computes a chunk is seen once it returns."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._request)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _request(self, number: int, frame) -> None:
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number
        log.log("signal", f"{signal.Signals(number).name} received: saving at the end of this segment, then stopping")

    def requested(self) -> bool:
        """Whether a signal asked to stop, in this process or any other of a distributed run: every process
        asks at the same point of its loop and gets the same answer (an all-gather of each one's signal, on
        several processes only), so that all save the same step and stop together."""
        number = distributed.max_over_processes(self.signal_number or 0)
        if number and self.signal_number is None:
            self.signal_number = number  # another process's signal: stop with it
        return bool(number)

    def check(self, what: str) -> None:
        """Raise `Interrupted` (saying `what` was saved) if a signal asked to stop (`requested`)."""
        if self.requested():
            name = signal.Signals(self.signal_number).name
            raise Interrupted(f"stopped by {name}: {what}; run the same command to resume", self.signal_number)
