"""Helpers for launching real trainer processes (no mocks) and reading what they leave behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PYTHON = sys.executable
TORCHRUN = str(Path(PYTHON).with_name("torchrun"))


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """A port P with P .. P + count - 1 all free (ranks serve on P + local rank)."""
    for _ in range(100):
        base = free_port()
        if all(_port_free(base + i) for i in range(1, count)):
            return base
    raise AssertionError(f"no {count} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def progress_of(port: int) -> dict[str, Any]:
    """A rank's /progress, or {} while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
    except OSError:
        return {}
    return result


@dataclass
class Gang:
    """Trainer ranks started the way torchrun starts them (env:// rendezvous)."""

    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"trainer did not finish in {timeout}s:\n{self.log()}"
                ) from None
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def log(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)


def launch(
    world_size: int, args: Sequence[str], log_dir: Path, extra_env: dict[str, str] | None = None
) -> Gang:
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = base_env() | (extra_env or {})
        if world_size > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        log = log_dir / f"rank{rank}.log"
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [PYTHON, "-m", "phalanx_trainer", *args],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.append(log)
    return Gang(procs, logs)


def run_ok(world_size: int, args: Sequence[str], log_dir: Path, timeout: float = 240) -> Gang:
    gang = launch(world_size, args, log_dir)
    codes = gang.wait(timeout)
    assert codes == [0] * world_size, f"exit codes {codes}:\n{gang.log()}"
    return gang


def torchrun(
    nproc: int, args: Sequence[str], log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                TORCHRUN,
                f"--nproc-per-node={nproc}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                "-m",
                "phalanx_trainer",
                *args,
            ],
            env=base_env() | (extra_env or {}),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so cleanup can end the agent and its workers together
        )


def child_pids(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def wait_for(condition: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> None:
    """Poll ``condition`` until true; fail early if the processes under test have exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if not alive():
            raise AssertionError("the trainer exited before the condition was met")
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def export_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    export = checkpoint_dir / "export"
    assert (export / "COMPLETE").is_file(), f"{export} was not published"
    return load_file(str(export / "model.safetensors"))


def records(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """The trainer's per-step log, as written."""
    lines = (checkpoint_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(checkpoint_dir: Path) -> dict[int, float]:
    """step -> training loss from the trainer's per-step log."""
    return {int(r["step"]): float(r["loss"]) for r in records(checkpoint_dir)}


def val_losses(checkpoint_dir: Path) -> dict[int, float]:
    """step -> validation loss, for the steps after which the trainer evaluated."""
    return {int(r["step"]): float(r["valLoss"]) for r in records(checkpoint_dir) if "valLoss" in r}


def run_in_process(args: Sequence[str], environ: dict[str, str] | None = None) -> int:
    """One rank inside the test process (no launch cost); returns the trainer's exit code.

    Settings come from ``args`` and ``environ`` only, never from the test's own environment.
    """
    from phalanx_trainer.cli import main

    return main(args, environ or {})
