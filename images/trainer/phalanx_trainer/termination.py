"""How the trainer ends: a classified exit code and the termination message the operator reads.

torchrun exits 1 whenever any worker fails, so the container's exit code says nothing about
the cause. Each worker therefore classifies its own end (``classify``, pure) and the first one
of a container to end writes one JSON line to ``$PHALANX_TERMINATION_LOG`` (the container's
``terminationMessagePath``); see docs/progress-contract.md for the wire format.

This module never imports torch, so configuration errors are classified before it loads.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TERMINATION_LOG_ENV = "PHALANX_TERMINATION_LOG"
# The kubelet keeps at most this many bytes of the message.
MAX_MESSAGE_BYTES = 4096

EXIT_COMPLETED = 0
EXIT_ERROR = 1
EXIT_INVALID_CONFIG = 2
EXIT_DATA_ERROR = 3
EXIT_CHECKPOINT_ERROR = 4
EXIT_OUT_OF_MEMORY = 10
EXIT_COMMUNICATION_ERROR = 11

REASON_COMPLETED = "Completed"
REASON_ERROR = "Error"
REASON_INVALID_CONFIG = "InvalidConfig"
REASON_DATA_ERROR = "DataError"
REASON_CHECKPOINT_ERROR = "CheckpointError"
REASON_OUT_OF_MEMORY = "OutOfMemory"
REASON_COMMUNICATION_ERROR = "CommunicationError"
REASON_USER_EXIT = "UserExit"
# Stopped by SIGTERM/SIGINT at a step boundary (checkpoint written): exit 128 + signal.
REASON_STOPPED = "Stopped"

# Backends raise plain RuntimeErrors when a peer is lost; their messages are all we have.
# Matched case-insensitively as substrings.
COMMUNICATION_PATTERNS: tuple[str, ...] = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "gloo/transport",
    "nccl error",
    "ncclsystemerror",
    "ncclremoteerror",
    "nccl communicator",
    "hccl",
    "watchdog caught collective operation timeout",
    "timed out waiting",
    "socket timeout",
    "rendezvous",
)
OUT_OF_MEMORY_PATTERNS: tuple[str, ...] = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
)


class TrainerError(Exception):
    """An end the trainer understands; the subclass fixes the exit code and reason."""

    exit_code = EXIT_ERROR
    reason = REASON_ERROR


class InvalidConfig(TrainerError):
    """Bad arguments, preset, device or data path: retrying cannot help."""

    exit_code = EXIT_INVALID_CONFIG
    reason = REASON_INVALID_CONFIG


class DataError(TrainerError):
    """The data set cannot be read or is too small."""

    exit_code = EXIT_DATA_ERROR
    reason = REASON_DATA_ERROR


class CheckpointError(TrainerError):
    """A checkpoint exists but cannot be loaded."""

    exit_code = EXIT_CHECKPOINT_ERROR
    reason = REASON_CHECKPOINT_ERROR


@dataclass(frozen=True)
class Termination:
    exit_code: int
    reason: str
    message: str
    export_path: str | None = None
    export_steps: tuple[int, ...] | None = None
    progress: dict[str, Any] | None = None  # rank 0's final /progress, on success

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "message": self.message,
        }
        if self.export_path is not None:
            out["exportPath"] = self.export_path
        if self.export_steps is not None:
            out["exportSteps"] = list(self.export_steps)
        if self.progress is not None:
            out["progress"] = self.progress
        return out

    def line(self) -> str:
        """One JSON line within the kubelet's limit; what does not fit is shed, never cut.

        In order, until it fits: the copy of ``exportSteps`` inside ``progress``, then
        ``progress``, then the tail of the message, then the oldest ``exportSteps`` (the
        newest snapshots are the ones still being asked for).
        """
        payload = self.to_json()

        def encoded(candidate: dict[str, Any]) -> bytes:
            return (json.dumps(candidate, ensure_ascii=False) + "\n").encode()

        def fits(candidate: dict[str, Any]) -> bool:
            return len(encoded(candidate)) <= MAX_MESSAGE_BYTES

        if fits(payload):
            return encoded(payload).decode()
        if isinstance(payload.get("progress"), dict):
            payload["progress"] = {
                k: v for k, v in payload["progress"].items() if k != "exportSteps"
            }
            if fits(payload):
                return encoded(payload).decode()
            del payload["progress"]
            if fits(payload):
                return encoded(payload).decode()
        message = self.message
        short = message if len(message) <= 80 else message[:80] + "..."
        shortest = payload | {"message": short}
        steps = list(payload.get("exportSteps", []))
        if not fits(shortest) and steps:
            payload = shortest
            message = str(payload["message"])
            # The longest tail of the steps that fits, by bisection.
            lo, hi = 0, len(steps)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(payload | {"exportSteps": steps[len(steps) - mid :]}):
                    lo = mid
                else:
                    hi = mid - 1
            payload["exportSteps"] = steps[len(steps) - lo :]
            if fits(payload):
                return encoded(payload).decode()
        # The longest prefix of the message that fits (characters differ in bytes).
        lo, hi = 0, len(message)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(payload | {"message": message[:mid] + "..."}):
                lo = mid
            else:
                hi = mid - 1
        return encoded(payload | {"message": message[:lo] + "..."}).decode()


def completed(
    message: str,
    export_path: str | None = None,
    export_steps: Sequence[int] | None = None,
    progress: dict[str, Any] | None = None,
) -> Termination:
    steps = tuple(export_steps) if export_steps is not None else None
    return Termination(EXIT_COMPLETED, REASON_COMPLETED, message, export_path, steps, progress)


def stopped(signum: int, message: str) -> Termination:
    return Termination(128 + signum, REASON_STOPPED, message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _matches(exc: BaseException, patterns: Sequence[str]) -> bool:
    text = str(exc).lower()
    return any(p in text for p in patterns)


def _torch_type(exc: BaseException, dotted: str) -> bool:
    """isinstance against a torch class, without importing torch when it never loaded."""
    torch = sys.modules.get("torch")
    obj: Any = torch
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part, None)
    return isinstance(obj, type) and isinstance(exc, obj)


def classify(exc: BaseException) -> Termination | None:
    """The termination an exception stands for; None for a clean ``SystemExit(0)`` (``--help``)."""
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None or code == 0:
            return None
        if isinstance(code, int):
            return Termination(code, REASON_USER_EXIT, f"the trainer called sys.exit({code})")
        # sys.exit("text") prints the text and exits 1.
        return Termination(EXIT_ERROR, REASON_USER_EXIT, str(code))
    if isinstance(exc, TrainerError):
        return Termination(exc.exit_code, exc.reason, _first_line(exc))
    if isinstance(exc, MemoryError) or _torch_type(exc, "torch.OutOfMemoryError"):
        return Termination(EXIT_OUT_OF_MEMORY, REASON_OUT_OF_MEMORY, _first_line(exc))
    if _torch_type(exc, "torch.distributed.DistError") or (
        isinstance(exc, (RuntimeError, OSError)) and _matches(exc, COMMUNICATION_PATTERNS)
    ):
        return Termination(
            EXIT_COMMUNICATION_ERROR,
            REASON_COMMUNICATION_ERROR,
            f"a collective failed (a peer was probably lost): {_first_line(exc)}",
        )
    if isinstance(exc, RuntimeError) and _matches(exc, OUT_OF_MEMORY_PATTERNS):
        return Termination(EXIT_OUT_OF_MEMORY, REASON_OUT_OF_MEMORY, _first_line(exc))
    return Termination(EXIT_ERROR, REASON_ERROR, f"{type(exc).__name__}: {_first_line(exc)}")


def termination_log_path(environ: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    value = env.get(TERMINATION_LOG_ENV, "")
    return Path(value) if value else None


def write_termination_log(path: Path, termination: Termination) -> bool:
    """Write the message unless another worker of this container already did; True if written.

    The kubelet creates the file empty, so "first" means "found empty under an exclusive
    lock": the root cause survives the peers that fail after it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size > 0:
            return False
        os.write(fd, termination.line().encode())
        os.fsync(fd)
        return True
    finally:
        os.close(fd)  # also releases the lock


def report(termination: Termination, environ: Mapping[str, str]) -> None:
    """Write the termination message; on success only rank 0 speaks for the container."""
    path = termination_log_path(environ)
    if path is None:
        return
    if termination.exit_code == EXIT_COMPLETED and environ.get("RANK", "0") != "0":
        return
    try:
        write_termination_log(path, termination)
    except OSError as exc:
        print(f"phalanx-train: cannot write the termination log {path}: {exc}", file=sys.stderr)


def conclude(exc: BaseException, environ: Mapping[str, str]) -> Termination | None:
    """Classify a failure, report it, then print it; None for a clean exit (``--help``).

    The message is written first: torchrun signals the surviving workers as soon as one
    fails, and a process-group teardown after a lost peer can hang until it kills them.
    """
    termination = classify(exc)
    if termination is None:
        return None
    report(termination, environ)
    traceback.print_exception(exc)
    print(
        f"phalanx-train: {termination.reason} (exit {termination.exit_code}): "
        f"{termination.message}",
        file=sys.stderr,
    )
    return termination
