"""Process-group setup from the launcher's environment (torchrun or plain single process)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise InvalidConfig("--device cuda was requested but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_distributed(device: str = "auto", timeout_s: float = 900.0) -> DistEnv:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT.

    Without those variables this is a single process; it still gets a (one-member) process
    group so barriers and distributed checkpointing behave the same everywhere. NCCL on GPU,
    gloo on CPU. The timeout bounds how long a rank waits for a dead peer in a collective;
    it must exceed the slowest checkpoint save, since ranks wait for each other around it.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **kwargs)  # type: ignore[arg-type]
        else:
            store = dist.HashStore()  # type: ignore[attr-defined]  # not re-exported in stubs
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    return DistEnv(rank, local_rank, world_size, dev, backend)


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
