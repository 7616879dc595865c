"""jmoe.train.preemption: SIGTERM / SIGINT are noted (not raised) inside StopRequests, a second
Ctrl-C stops at once, the previous handlers come back, and processes agree on the stop."""

import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
from run_cases import cli_env

from jmoe.train.preemption import RunStopped, StopRequests

HERE = pathlib.Path(__file__).parent


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_noted_until_the_loop_asks(signum):
    before = signal.getsignal(signum)
    with StopRequests() as stop:
        assert stop.requested() is None
        os.kill(os.getpid(), signum)  # delivered to this, the main, thread
        assert stop.requested() == signum
        assert stop.requested() == signum  # the request stays
    assert signal.getsignal(signum) is before


def test_second_ctrl_c_stops_at_once():
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() == signal.SIGTERM


def test_run_stopped_message_and_exit_status():
    stopped = RunStopped(17, signal.SIGTERM)
    assert str(stopped) == "stopped at step 17; rerun the same command to resume"
    assert stopped.step == 17 and stopped.exit_status == 143
    assert RunStopped(3, signal.SIGINT).exit_status == 130


def test_processes_agree_on_the_step_to_stop_at(tmp_path):
    """Two jax.distributed processes; only process 1 gets SIGTERM, before step 3: both stop
    there."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    script = str(HERE / "preemption_multiprocess.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, port, str(i), str(tmp_path / f"{i}.txt")],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        finally:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    seen = [(tmp_path / f"{i}.txt").read_text().split() for i in range(2)]
    assert seen == [["None", "None", "15", "15"]] * 2
