from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from phalanx.devcluster import processes
from phalanx.devcluster.processes import PidRecord, ProcessState

SLEEP = shutil.which("sleep") or "/bin/sleep"


@pytest.fixture
def pid_file(tmp_path: Path) -> Path:
    return tmp_path / "run" / "sleeper.pid"


def test_started_process_is_running_until_stopped(pid_file: Path, tmp_path: Path) -> None:
    record = processes.start_process((SLEEP, "60"), pid_file=pid_file, log_file=tmp_path / "s.log")

    assert processes.process_state(pid_file) is ProcessState.RUNNING
    assert processes.resident_bytes(record) > 0
    assert processes.stop_process(pid_file) is True
    assert processes.process_state(pid_file) is ProcessState.STOPPED
    assert not processes.is_alive(record)


def test_stopping_twice_is_harmless(pid_file: Path, tmp_path: Path) -> None:
    processes.start_process((SLEEP, "60"), pid_file=pid_file, log_file=tmp_path / "s.log")

    assert processes.stop_process(pid_file) is True
    assert processes.stop_process(pid_file) is False


def test_exited_process_reads_as_crashed(pid_file: Path, tmp_path: Path) -> None:
    record = processes.start_process((SLEEP, "0"), pid_file=pid_file, log_file=tmp_path / "s.log")
    deadline = time.monotonic() + 10
    while processes.is_alive(record) and time.monotonic() < deadline:
        time.sleep(0.01)

    assert processes.process_state(pid_file) is ProcessState.CRASHED


def test_reused_pid_with_another_start_time_is_never_signalled(pid_file: Path) -> None:
    own_ticks = processes.process_start_ticks(os.getpid())
    assert own_ticks is not None
    pid_file.parent.mkdir(parents=True)
    stale = PidRecord(os.getpid(), own_ticks + 1, SLEEP)
    pid_file.write_text(stale.to_json())

    assert processes.process_state(pid_file) is ProcessState.CRASHED
    assert processes.stop_process(pid_file) is False  # and this test process is still alive
    assert not pid_file.exists()


def test_garbled_pid_file_reads_as_crashed(pid_file: Path) -> None:
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text("not json")

    assert processes.process_state(pid_file) is ProcessState.CRASHED
