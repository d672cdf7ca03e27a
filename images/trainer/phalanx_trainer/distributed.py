"""Process-group setup from the launcher's environment (torchrun or plain single process)."""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from phalanx_trainer.termination import InvalidConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    # Processes on this host (torchrun's LOCAL_WORLD_SIZE); None when the launcher is unknown.
    local_world_size: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


RANK_TABLE_ENV = "RANK_TABLE_FILE"
RANK_TABLE_WAIT_S = 600.0
BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def import_torch_npu() -> bool:
    """Load Ascend support if installed (it registers ``torch.npu`` and the hccl backend)."""
    try:
        import torch_npu  # noqa: F401  # optional: registers the npu device
    except ImportError:
        return False
    return True


def npu_available() -> bool:
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def expected_device(requested: str, environ: Mapping[str, str]) -> str:
    """The device a run asks for: ``--device``, or for ``auto`` what the launcher wired.

    An HCCL rank table (``RANK_TABLE_FILE``, set by the operator for Ascend jobs) means NPUs
    were requested, so ``auto`` must find them rather than train on the CPU.
    """
    if requested != "auto":
        return requested
    if environ.get(RANK_TABLE_ENV):
        return "npu"
    return "auto"


def pick_device(
    requested: str, local_rank: int, environ: Mapping[str, str] | None = None
) -> torch.device:
    """The device of this process; a requested accelerator that is missing is an error,
    never a silent fallback to the CPU."""
    env = os.environ if environ is None else environ
    wanted = expected_device(requested, env)
    if wanted in ("npu", "auto"):
        has_torch_npu = import_torch_npu()
        if wanted == "npu" and not has_torch_npu:
            raise InvalidConfig(
                "NPUs were requested (--device npu or an HCCL rank table in $RANK_TABLE_FILE) "
                "but torch_npu is not installed; use an image with torch_npu (Ascend "
                "CANN toolkit) or --device cpu"
            )
    if wanted == "auto":
        if torch.cuda.is_available():
            wanted = "cuda"
        elif npu_available():
            wanted = "npu"
        else:
            wanted = "cpu"
    if wanted == "cuda":
        if not torch.cuda.is_available():
            raise InvalidConfig(
                "--device cuda was requested but no CUDA device is visible; check the pod's "
                "GPU request and the NVIDIA device plugin, or use --device cpu"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if wanted == "npu":
        if not npu_available():
            raise InvalidConfig(
                "NPUs were requested but torch_npu sees none; check the pod's Ascend request "
                "and the Ascend device plugin, or use --device cpu"
            )
        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]
        return torch.device("npu", local_rank)
    if wanted != "cpu":
        raise InvalidConfig(f"--device {requested!r} is not one of auto, cuda, npu, cpu")
    return torch.device("cpu")


@dataclass(frozen=True)
class RankTable:
    """The parts of an HCCL rank table (MindCluster hccl.json 1.0) the trainer checks."""

    servers: int
    rank_ids: tuple[int, ...]


def parse_rank_table(doc: Mapping[str, Any]) -> RankTable | None:
    """The table, or None while it still says ``initializing`` (devices not yet known)."""
    status = doc.get("status")
    if status == "initializing":
        return None
    if status != "completed":
        raise InvalidConfig(f"the HCCL rank table has status {status!r}, not 'completed'")
    try:
        servers = doc["server_list"]
        rank_ids = [int(d["rank_id"]) for server in servers for d in server["device"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidConfig(f"the HCCL rank table is malformed: {exc!r}") from exc
    if sorted(rank_ids) != list(range(len(rank_ids))):
        raise InvalidConfig(f"the HCCL rank table's rank_ids are not 0..n-1: {rank_ids}")
    return RankTable(servers=len(servers), rank_ids=tuple(rank_ids))


def check_rank_table(table: RankTable, world_size: int) -> None:
    if len(table.rank_ids) != world_size:
        raise InvalidConfig(
            f"the HCCL rank table lists {len(table.rank_ids)} devices on {table.servers} "
            f"servers but the job has {world_size} processes; processesPerNode must equal "
            "the NPUs per pod"
        )


def wait_for_rank_table(path: Path, timeout_s: float = RANK_TABLE_WAIT_S) -> RankTable:
    """Wait until the operator has filled the table in (the mounted ConfigMap updates)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            table = parse_rank_table(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise InvalidConfig(f"cannot read the HCCL rank table {path}: {exc}") from exc
        if table is not None:
            return table
        if time.monotonic() > deadline:
            raise InvalidConfig(
                f"the HCCL rank table {path} still says 'initializing' after {timeout_s:.0f}s: "
                "the device plugin has not annotated every pod with its NPUs"
            )
        time.sleep(2.0)


def init_distributed(
    device: str = "auto", timeout_s: float = 900.0, environ: Mapping[str, str] | None = None
) -> DistEnv:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT.

    Without those variables this is a single process; it still gets a (one-member) process
    group so barriers and distributed checkpointing behave the same everywhere. NCCL on GPU,
    HCCL on Ascend NPU (after checking the rank table against the world size), gloo on CPU.
    The timeout bounds how long a rank waits for a dead peer in a collective; it must exceed
    the slowest checkpoint save, since ranks wait for each other around it.
    """
    env = os.environ if environ is None else environ
    rank = int(env.get("RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank, env)
    backend = BACKENDS[dev.type]
    if dev.type == "npu" and env.get(RANK_TABLE_ENV):
        check_rank_table(wait_for_rank_table(Path(env[RANK_TABLE_ENV])), world_size)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "MASTER_ADDR" in env:
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **kwargs)  # type: ignore[arg-type]
        else:
            store = dist.HashStore()  # type: ignore[attr-defined]  # not re-exported in stubs
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    local_world = int(env["LOCAL_WORLD_SIZE"]) if env.get("LOCAL_WORLD_SIZE") else None
    if local_world is None and "MASTER_ADDR" not in env:
        local_world = 1  # a single process
    return DistEnv(rank, local_rank, world_size, dev, backend, local_world)


def new_gloo_group() -> dist.ProcessGroup:
    """A CPU side group (collective call: every rank must create it, in the same order)."""
    group = dist.new_group(backend="gloo")
    assert isinstance(group, dist.ProcessGroup)
    return group


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True if any rank raised ``flag`` (so every rank takes the same branch)."""
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
