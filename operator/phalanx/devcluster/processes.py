"""Start and stop background processes, tracked by PID files that carry the start time.

A PID alone can be reused by an unrelated process after a crash or reboot; the kernel's
start time (field 22 of /proc/<pid>/stat) plus the executable path pin down exactly the
process we started, so `down` never signals anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class ProcessState(Enum):
    RUNNING = "running"
    CRASHED = "crashed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_ticks: int
    executable: str

    def to_json(self) -> str:
        return json.dumps(
            {"pid": self.pid, "startTicks": self.start_ticks, "executable": self.executable}
        )

    @classmethod
    def from_json(cls, text: str) -> PidRecord:
        data = json.loads(text)
        return cls(int(data["pid"]), int(data["startTicks"]), str(data["executable"]))


def start_process(
    argv: tuple[str, ...],
    *,
    pid_file: Path,
    log_file: Path,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> PidRecord:
    """Start `argv` in its own session (it outlives the caller) and record it in `pid_file`.

    `preexec` runs in the child before exec (to enter the cluster's network namespace).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
            preexec_fn=preexec,
        )
    ticks = process_start_ticks(process.pid)
    record = PidRecord(process.pid, ticks if ticks is not None else -1, argv[0])
    pid_file.write_text(record.to_json() + "\n")
    return record


def read_pid_file(pid_file: Path) -> PidRecord | None:
    try:
        return PidRecord.from_json(pid_file.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def process_state(pid_file: Path) -> ProcessState:
    if not pid_file.exists():
        return ProcessState.STOPPED
    record = read_pid_file(pid_file)
    if record is not None and is_alive(record):
        return ProcessState.RUNNING
    return ProcessState.CRASHED


def is_alive(record: PidRecord) -> bool:
    """True only for the very process the record describes, and not a zombie."""
    try:
        stat = Path(f"/proc/{record.pid}/stat").read_text()
    except OSError:
        return False
    state, ticks = _parse_stat(stat)
    if ticks != record.start_ticks or (state == "Z" and not _has_live_threads(record.pid)):
        return False
    try:
        executable = os.readlink(f"/proc/{record.pid}/exe")
    except OSError:
        return True  # not ours to inspect (another user); the start time already matched
    # A rebuilt binary leaves the running process pointing at the replaced inode.
    return executable.removesuffix(" (deleted)") == os.path.realpath(record.executable)


def stop_process(pid_file: Path, *, timeout: float = 15.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`; removes the PID file. True if it was running."""
    record = read_pid_file(pid_file)
    was_running = record is not None and is_alive(record)
    if record is not None and was_running:
        _signal(record, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_alive(record) and time.monotonic() < deadline:
            _reap(record.pid)
            time.sleep(0.05)
        if is_alive(record):
            _signal(record, signal.SIGKILL)
            while is_alive(record):
                _reap(record.pid)
                time.sleep(0.05)
        _reap(record.pid)
    pid_file.unlink(missing_ok=True)
    return was_running


def process_start_ticks(pid: int) -> int | None:
    try:
        return _parse_stat(Path(f"/proc/{pid}/stat").read_text())[1]
    except OSError:
        return None


def resident_bytes(record: PidRecord) -> int:
    """Resident set size of a live process (0 when it is gone)."""
    if not is_alive(record):
        return 0
    try:
        for line in Path(f"/proc/{record.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _has_live_threads(pid: int) -> bool:
    """A Go process whose main thread exited shows state Z while its other threads still run."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _parse_stat(stat: str) -> tuple[str, int]:
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _signal(record: PidRecord, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signum)


def _reap(pid: int) -> None:
    """Collect the exit status when the caller is the parent, so no zombie lingers."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
