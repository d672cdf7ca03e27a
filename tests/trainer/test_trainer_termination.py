"""The termination contract: every end classified, one JSON line, the first failing worker wins.

The classification table is checked on exceptions the backends really raise; the file is
checked with real trainers under torchrun (2 gloo workers), whose own exit code is 1 for any
worker failure, which is why the file exists.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from trainer_testkit import child_pids, run_in_process, torchrun, wait_for

from phalanx_trainer.checkpoint import volume_relative
from phalanx_trainer.data import prepare
from phalanx_trainer.termination import (
    MAX_MESSAGE_BYTES,
    CheckpointError,
    DataError,
    InvalidConfig,
    Termination,
    classify,
    completed,
    write_termination_log,
)

# What gloo raises in a survivor when its peer's process dies (copied from a real run).
GLOO_PEER_LOST = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
    "[127.0.0.1]:12196. This is typically caused by a remote worker crashing."
)
CPU_ALLOC_FAILED = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 400000000000000 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (InvalidConfig("unknown preset 'nanoo'"), 2, "InvalidConfig"),
        (DataError("split 'train' is too small"), 3, "DataError"),
        (CheckpointError("no checkpoint could be loaded"), 4, "CheckpointError"),
        (MemoryError(), 10, "OutOfMemory"),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            10,
            "OutOfMemory",
        ),
        (RuntimeError(CPU_ALLOC_FAILED), 10, "OutOfMemory"),
        (RuntimeError(GLOO_PEER_LOST), 11, "CommunicationError"),
        (torch.distributed.DistNetworkError("failed to recv"), 11, "CommunicationError"),
        (SystemExit(7), 7, "UserExit"),
        (SystemExit("bye"), 1, "UserExit"),
        (ValueError("something else"), 1, "Error"),
    ],
    ids=[
        "invalid-config",
        "data",
        "checkpoint",
        "host-oom",
        "device-oom",
        "cpu-allocator-oom",
        "gloo-peer-lost",
        "dist-network-error",
        "user-exit-code",
        "user-exit-message",
        "anything-else",
    ],
)
def test_classify(exc: BaseException, code: int, reason: str) -> None:
    termination = classify(exc)
    assert termination is not None
    assert (termination.exit_code, termination.reason) == (code, reason)
    assert termination.message


def test_clean_exit_is_not_a_termination() -> None:
    assert classify(SystemExit(0)) is None
    assert classify(SystemExit(None)) is None


def test_long_message_is_shortened_to_the_kubelet_limit() -> None:
    line = Termination(1, "Error", "é" * 10_000).line()
    assert len(line.encode()) <= MAX_MESSAGE_BYTES
    assert json.loads(line)["message"].endswith("...")


def test_success_line_carries_the_export_fields() -> None:
    line = completed("done", export_path="export", export_steps=[50, 100]).line()
    assert json.loads(line) == {
        "exitCode": 0,
        "reason": "Completed",
        "message": "done",
        "exportPath": "export",
        "exportSteps": [50, 100],
    }


def test_first_writer_wins(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    path.touch()  # the kubelet creates it empty
    assert write_termination_log(path, Termination(11, "CommunicationError", "peer lost"))
    assert not write_termination_log(path, Termination(1, "Error", "cascade"))
    assert json.loads(path.read_text())["reason"] == "CommunicationError"


# -- real trainers ----------------------------------------------------------------------------


def train_args(data: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data),
        "--checkpoint-dir", str(ckpt),
        "--batch-size", "2",
        "--seq-len", "32",
        "--lr", "3e-3",
        "--warmup-steps", "1",
        "--log-every", "1",
        "--metrics-port", "-1",
        *extra,
    ]  # fmt: skip


def read_log(path: Path) -> dict[str, object]:
    lines = path.read_text().splitlines()
    assert len(lines) == 1, lines  # one line, from the first worker to end
    record: dict[str, object] = json.loads(lines[0])
    return record


@pytest.mark.e2e
@pytest.mark.slow
def test_torchrun_bad_config_writes_invalid_config(prepared_data: Path, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    args = train_args(prepared_data, tmp_path / "ckpt", "--steps", "3", "--seq-len", "4096")
    agent = torchrun(2, args, tmp_path / "torchrun.log", {"PHALANX_TERMINATION_LOG": str(log)})
    assert agent.wait(timeout=180) == 1  # torchrun's own code says only "a worker failed"
    record = read_log(log)
    assert record["exitCode"] == 2
    assert record["reason"] == "InvalidConfig"
    assert "max_seq_len 256" in str(record["message"])


@pytest.mark.e2e
@pytest.mark.slow
def test_torchrun_success_writes_completed_with_exports(
    prepared_data: Path, tmp_path: Path
) -> None:
    log = tmp_path / "termination-log"
    args = train_args(
        prepared_data, tmp_path / "ckpt", "--steps", "4", "--export-every", "2",
        "--checkpoint-every", "0",
    )  # fmt: skip
    agent = torchrun(2, args, tmp_path / "torchrun.log", {"PHALANX_TERMINATION_LOG": str(log)})
    assert agent.wait(timeout=240) == 0, (tmp_path / "torchrun.log").read_text()
    record = read_log(log)
    progress = record.pop("progress")
    assert record == {
        "exitCode": 0,
        "reason": "Completed",
        "message": "training complete at step 4; exported to export",
        "exportPath": "export",
        "exportSteps": [2, 4],
    }
    # The final /progress travels with it: the operator's last poll may be steps behind.
    assert (progress["step"], progress["totalSteps"]) == (4, 4)
    assert progress["exportSteps"] == [2, 4]
    assert (tmp_path / "ckpt" / str(record["exportPath"]) / "COMPLETE").is_file()


@pytest.mark.e2e
@pytest.mark.slow
def test_torchrun_killed_worker_leaves_the_survivors_communication_error(
    prepared_data: Path, tmp_path: Path
) -> None:
    log = tmp_path / "termination-log"
    ckpt = tmp_path / "ckpt"
    args = train_args(prepared_data, ckpt, "--steps", "100000", "--checkpoint-every", "0")
    agent = torchrun(2, args, tmp_path / "torchrun.log", {"PHALANX_TERMINATION_LOG": str(log)})
    try:
        wait_for(
            lambda: (ckpt / "train_log.jsonl").exists(),
            timeout=180,
            alive=lambda: agent.poll() is None,
        )
        workers = child_pids(agent.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)  # a SIGKILLed worker writes nothing
        assert agent.wait(timeout=120) != 0
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    record = read_log(log)
    assert (record["exitCode"], record["reason"]) == (11, "CommunicationError"), record
    assert "peer" in str(record["message"])


def test_validation_without_a_val_split(tmp_path: Path) -> None:
    """By default a data set without a val split trains without validation; asking for
    validation on it is a DataError (exit 3), not a silently skipped setting."""
    docs = [
        f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(60)
    ]
    data = prepare(docs, tmp_path / "data", vocab_size=280, val_every=0)
    args = [
        "--data", str(data.path), "--steps", "2", "--batch-size", "1", "--seq-len", "8",
        "--metrics-port", "-1", "--no-export",
    ]  # fmt: skip
    assert run_in_process([*args, "--checkpoint-dir", str(tmp_path / "a")]) == 0
    log = tmp_path / "termination-log"
    code = run_in_process(
        [*args, "--checkpoint-dir", str(tmp_path / "b"), "--eval-every", "5"],
        {"PHALANX_TERMINATION_LOG": str(log)},
    )
    assert code == 3
    record = read_log(log)
    assert record["reason"] == "DataError"
    assert "no 'val' split" in str(record["message"])


@pytest.mark.parametrize(
    ("checkpoint_dir", "volume", "expected"),
    [("vol", None, "export"), ("vol", "vol", "export"), ("vol/run1", "vol", "run1/export"),
     ("elsewhere", "vol", None)],
    ids=["no-volume", "volume-root", "subdirectory", "outside"],
)  # fmt: skip
def test_export_path_is_relative_to_the_volume(
    tmp_path: Path, checkpoint_dir: str, volume: str | None, expected: str | None
) -> None:
    root = tmp_path / checkpoint_dir
    assert volume_relative(root / "export", str(tmp_path / volume) if volume else None) == expected


def test_success_reports_the_export_under_a_volume_subdirectory(
    prepared_data: Path, tmp_path: Path
) -> None:
    log = tmp_path / "termination-log"
    volume = tmp_path / "volume"
    args = train_args(prepared_data, volume / "run1", "--steps", "2", "--checkpoint-every", "0")
    environ = {"PHALANX_TERMINATION_LOG": str(log), "PHALANX_CHECKPOINT_DIR": str(volume)}
    assert run_in_process(args, environ) == 0
    record = read_log(log)
    assert record["exportPath"] == "run1/export"
    assert (volume / str(record["exportPath"]) / "COMPLETE").is_file()


def test_an_oversized_success_line_sheds_the_copies_first() -> None:
    steps = list(range(100, 300_100, 100))  # 3000 snapshots: far over 4096 bytes
    progress = {"step": 300_000, "totalSteps": 300_000, "exportSteps": steps}
    line = completed("done", "export", steps, progress=progress).line()
    assert len(line.encode()) <= MAX_MESSAGE_BYTES
    record = json.loads(line)
    assert (record["reason"], record["exportPath"], record["message"]) == (
        "Completed", "export", "done",
    )  # fmt: skip
    kept = record["exportSteps"]
    assert kept == steps[-len(kept) :]  # the newest ones, ascending
    assert len(kept) > 300
    # Small enough without exportSteps inside progress: progress stays.
    few = list(range(100, 30_100, 100))
    record = json.loads(
        completed("done", "export", few, progress={"step": 1, "exportSteps": few}).line()
    )
    assert record["progress"] == {"step": 1}
    assert record["exportSteps"] == few
