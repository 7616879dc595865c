"""Stopping a run cleanly on SIGTERM (how cluster and TPU schedulers preempt) or SIGINT (Ctrl-C).

Inside `StopRequests`, either signal only notes the request; the training loop asks
`requested()` after each step, saves a checkpoint at that step and raises `RunStopped`. A
second Ctrl-C stops at once (KeyboardInterrupt). On several hosts every process asks at every
step and all agree, through one small all-gather, to stop at the same step: each must take part
in that checkpoint. `train.py` exits with the shell's status for the signal, 128 + its number
(143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import signal
import threading

from jmoe.train import multihost

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """The run stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step}; rerun the same command to resume")
        self.step, self.signum = step, signum

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by the signal: 128 + its number."""
        return 128 + self.signum


class StopRequests:
    """Notes SIGTERM / SIGINT while active (a context manager; the previous handlers come back
    on exit). Outside the main thread, where Python cannot handle signals, it notes nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.signum = self.signum or signum

    def requested(self) -> int | None:
        """The signal to stop on, agreed by every process (each must call this at the same
        step), or None to go on. A process that received none stops on SIGTERM."""
        if not multihost.any_process(self.signum is not None):
            return None
        return self.signum or signal.SIGTERM
