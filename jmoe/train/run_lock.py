"""One run per directory: a lock held for the run's whole life.

`RunLock(workdir)` takes an operating-system lock on `workdir/run.lock` (the `filelock` library;
the kernel drops it when the holding process ends, however it ends) and records who holds it
(process id, host, start time) in `workdir/run.holder.json`. A second run on the same directory
stops at once with an error naming the holder. A record left behind by a process that died
without releasing the lock (killed, out of memory) is taken over with a note. On several hosts,
process 0 holds the lock for the whole run (`hold_run_directory`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
from collections.abc import Iterator

import filelock

from jmoe.train import multihost, report
from jmoe.train.errors import UserError

LOCK_FILE = "run.lock"
HOLDER_FILE = "run.holder.json"


class RunDirectoryBusy(UserError):
    """Another run holds the run directory."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run directory."""

    pid: int
    host: str
    started: str  # local time, ISO 8601

    @classmethod
    def this_process(cls) -> Holder:
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(pid=os.getpid(), host=socket.gethostname(), started=now)

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host} (started {self.started})"


class RunLock:
    """The lock of one run directory (which must exist).

    Use as a context manager, or `acquire()` / `release()`.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.fspath(workdir)
        self._lock = filelock.FileLock(os.path.join(self.workdir, LOCK_FILE), timeout=0)
        self._holder_path = os.path.join(self.workdir, HOLDER_FILE)

    def acquire(self) -> Holder | None:
        """Takes the lock at once and records this process as its holder.

        Returns:
          The holder of a record left by a process that ended without releasing the lock (now
          taken over), or None.

        Raises:
          RunDirectoryBusy: another process holds the lock; the message names it.
        """
        try:
            self._lock.acquire()
        except filelock.Timeout:
            holder = self._read_holder()
            who = str(holder) if holder else "another process (not yet recorded)"
            raise RunDirectoryBusy(
                f"run directory {self.workdir!r} is in use by {who}: wait for that run to end "
                "or stop it, or use another --workdir"
            ) from None
        stale = self._read_holder()
        tmp = f"{self._holder_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(Holder.this_process()), f)
        os.replace(tmp, self._holder_path)  # readers never see half a record
        return stale

    def release(self) -> None:
        """Removes the holder record and releases the lock."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._holder_path)
        self._lock.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _read_holder(self) -> Holder | None:
        try:
            with open(self._holder_path) as f:
                return Holder(**json.load(f))
        except (OSError, ValueError, TypeError):  # absent, or not a record of ours
            return None


@contextlib.contextmanager
def hold_run_directory(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds `workdir` for a run: process 0 takes its `RunLock`; if it cannot, every process
    raises `RunDirectoryBusy` (so none waits on a run that never starts)."""
    lock = RunLock(workdir) if multihost.is_chief() else None
    error = None
    if lock is not None:
        try:
            stale = lock.acquire()
        except RunDirectoryBusy as e:
            error = e
        else:
            if stale is not None:
                report.warn(
                    f"run directory {lock.workdir!r} was held by {stale}, which ended without "
                    "releasing it; taking it over"
                )
    if multihost.any_process(error is not None):
        raise error or RunDirectoryBusy(
            f"process 0 could not take run directory {os.fspath(workdir)!r} (see its message)"
        )
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
