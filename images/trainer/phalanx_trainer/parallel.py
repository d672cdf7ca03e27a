"""Parallelism: DDP (full replicas), FSDP2 (``fully_shard``), and tensor parallelism composed
with FSDP2 on a 2-D ``(dp, tp)`` device mesh (DTensor).

Both keep parameter names unchanged for ``torch.distributed.checkpoint.state_dict``, so a
checkpoint written under one strategy loads under the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from phalanx_trainer.model import ModelConfig, Transformer, TransformerBlock
from phalanx_trainer.termination import InvalidConfig

Parallelism = Literal["ddp", "fsdp"]


def check_tensor_parallel(
    cfg: ModelConfig, tp: int, world: int, parallelism: str, local_world: int | None = None
) -> None:
    """Refuse a tensor-parallel degree the model or the job cannot split evenly, or whose
    groups would span hosts (TP's all-reduces run every block and need the fast links)."""
    if tp == 1:
        return
    if parallelism != "fsdp":
        raise InvalidConfig("--tensor-parallel > 1 composes with FSDP2: use --parallelism fsdp")
    if world % tp:
        raise InvalidConfig(f"--tensor-parallel {tp} does not divide the {world} processes")
    if local_world is not None and local_world % tp:
        raise InvalidConfig(
            f"--tensor-parallel {tp} does not divide the {local_world} processes per host: "
            "a TP group must stay on one host"
        )
    for name, value in (
        ("n_heads", cfg.n_heads),
        ("n_kv_heads", cfg.n_kv_heads),
        ("ffn_dim", cfg.ffn_dim),
    ):
        if value % tp:
            raise InvalidConfig(
                f"--tensor-parallel {tp} does not divide the model's {name} {value}"
            )


def mesh_shape(world: int, tp: int) -> tuple[int, int]:
    """(data-parallel, tensor-parallel) sizes. Ranks are laid out row-major, so the TP group
    of a rank is ``tp`` consecutive ranks: one host when ``tp`` divides the processes per node."""
    return world // tp, tp


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP on every block: q/k/v and w1/w3 split by output features (heads,
    hidden units), wo and w2 by input features, so each block needs one all-reduce in
    attention and one in the MLP. Embeddings, norms and the output stay replicated over TP
    (and are sharded by FSDP over the data-parallel dimension)."""
    tp = tp_mesh.size()
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers:
        assert isinstance(block, TransformerBlock)
        parallelize_module(block, tp_mesh, plan)
        # Each rank now holds n_heads / tp query heads and n_kv_heads / tp kv heads.
        block.attention.n_heads //= tp
        block.attention.n_kv_heads //= tp


def parallelize(
    model: Transformer,
    *,
    parallelism: Parallelism,
    device: torch.device,
    compile_blocks: bool = False,
    activation_checkpointing: bool = False,
    bf16_params: bool = False,
    tensor_parallel: int = 1,
) -> nn.Module:
    """Wrap ``model`` for training; returns the module to call (the same params either way).

    ``bf16_params`` under FSDP: parameters are all-gathered and computed in bf16 and
    gradients reduced in fp32 (``MixedPrecisionPolicy``); the sharded master weights and the
    optimizer state stay fp32. DDP ignores it (the loop autocasts instead).

    ``tensor_parallel`` > 1 (FSDP only): a 2-D ``(dp, tp)`` device mesh; blocks are split
    over ``tp`` with DTensor, then everything is sharded over ``dp`` with ``fully_shard``.
    """
    model.activation_checkpointing = activation_checkpointing
    world = dist.get_world_size()
    check_tensor_parallel(model.cfg, tensor_parallel, world, parallelism)
    if parallelism == "fsdp":
        dp, tp = mesh_shape(world, tensor_parallel)
        mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
        if tp > 1:
            apply_tensor_parallel(model, mesh["tp"])
    if compile_blocks:
        # Per-block compilation (in place, names unchanged): one graph reused by every layer,
        # and FSDP's per-block communication stays outside the compiled region.
        for block in model.layers:
            block.compile()
    if parallelism == "fsdp":
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16_params
            else MixedPrecisionPolicy()
        )
        dp_mesh = mesh["dp"]
        for block in model.layers:
            fully_shard(block, mesh=dp_mesh, mp_policy=policy)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy)
        return model
    if world == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def data_parallel_position(rank: int, world: int, tp: int) -> tuple[int, int]:
    """(dp rank, dp size): TP ranks of one group read the same batch."""
    return rank // tp, world // tp


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm over all ranks, clipping to ``max_norm``; returns the norm.

    Works for any mix of plain tensors (replicated on every rank) and DTensors on different
    meshes (TP weights on (dp, tp), the rest on dp), where ``clip_grad_norm_`` cannot stack
    the per-parameter norms: each rank sums its local squares, weighted by 1 / the number of
    ranks holding the same values, and one all-reduce adds them up.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    world = dist.get_world_size()
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        if isinstance(g, DTensor):
            replicas = 1
            for size, placement in zip(g.device_mesh.shape, g.placements, strict=True):
                if placement.is_replicate():
                    replicas *= size
            if any(placement.is_partial() for placement in g.placements):
                raise RuntimeError("clip_grad_norm: a gradient is still a partial sum")
            # Ranks outside the DTensor's mesh hold further copies of the same shards.
            replicas *= world // g.device_mesh.size()
            local = g.to_local()
        else:
            replicas, local = world, g
        total += local.float().pow(2).sum() / replicas
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        local.mul_(coef.to(local.dtype))
    return norm


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
