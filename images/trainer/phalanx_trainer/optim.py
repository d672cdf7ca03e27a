"""AdamW with linear warmup followed by cosine decay to a floor."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at ``step``: 0 -> 1 linearly over ``warmup``, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    fused: bool = False,
) -> torch.optim.AdamW:
    # Norm weights (1-D) are not decayed: shrinking them towards 0 only fights the scale.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup: int, total: int, min_ratio: float
) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup=warmup, total=total, min_ratio=min_ratio),
    )
