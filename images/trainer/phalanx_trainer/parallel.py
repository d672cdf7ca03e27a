"""Data parallelism: DDP (full replicas) or FSDP2 (``fully_shard``, sharded parameters).

Both keep parameter names unchanged for ``torch.distributed.checkpoint.state_dict``, so a
checkpoint written under one strategy loads under the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from phalanx_trainer.model import Transformer

Parallelism = Literal["ddp", "fsdp"]


def parallelize(
    model: Transformer,
    *,
    parallelism: Parallelism,
    device: torch.device,
    compile_blocks: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Wrap ``model`` for training; returns the module to call (the same params either way)."""
    model.activation_checkpointing = activation_checkpointing
    if compile_blocks:
        # Per-block compilation (in place, names unchanged): one graph reused by every layer,
        # and FSDP's per-block communication stays outside the compiled region.
        for block in model.layers:
            block.compile()
    world = dist.get_world_size()
    if parallelism == "fsdp":
        mesh = init_device_mesh(device.type, (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if world == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def no_grad_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (only the last one syncs)."""
    if not skip:
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(module: nn.Module) -> Transformer:
    inner = module.module if isinstance(module, DistributedDataParallel) else module
    assert isinstance(inner, Transformer)
    return inner
