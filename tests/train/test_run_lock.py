"""jmoe.train.run_lock: one run per directory. A held directory is refused naming its holder
(in this process and from another); release frees it; the record of a killed holder is taken
over with a note."""

import json
import os
import signal
import socket

import pytest
from run_cases import lock_holder

from jmoe.train.run_lock import HOLDER_FILE, RunDirectoryBusy, RunLock, hold_run_directory


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        record = json.loads((tmp_path / HOLDER_FILE).read_text())
        assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(RunDirectoryBusy) as info:
            RunLock(tmp_path).acquire()
        message = str(info.value)
        assert f"in use by process {os.getpid()} on {socket.gethostname()}" in message
        assert record["started"] in message and "another --workdir" in message
    assert not (tmp_path / HOLDER_FILE).exists()
    with RunLock(tmp_path) as lock:  # released: free again
        assert lock.workdir == str(tmp_path)


def test_directory_held_by_another_process(tmp_path, capsys):
    holder = lock_holder(tmp_path)
    try:
        busy = pytest.raises(RunDirectoryBusy, match=f"in use by process {holder.pid} on ")
        with busy, hold_run_directory(tmp_path):
            pass
        holder.send_signal(signal.SIGKILL)  # dies without releasing: the record stays
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert json.loads((tmp_path / HOLDER_FILE).read_text())["pid"] == holder.pid
    with hold_run_directory(tmp_path):
        note = capsys.readouterr().err
        assert f"held by process {holder.pid} on" in note and "taking it over" in note
        assert json.loads((tmp_path / HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / HOLDER_FILE).exists()
