"""Validation on a fixed held-out set: the same sequences at every evaluation and world size.

The set is the first ``samples`` windows of the ``val`` split in a fixed order (seed 0,
independent of ``--seed``), capped at what the split holds. Global sample ``i`` belongs to
rank ``i % world``; ranks with fewer real samples pad with ignored targets so that every rank
runs the same number of forward passes (FSDP's all-gathers are collective).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from phalanx_trainer.data import DistributedTokenLoader, PreparedData
from phalanx_trainer.loss import IGNORE_INDEX
from phalanx_trainer.termination import DataError

VAL_SPLIT = "val"
VAL_ORDER_SEED = 0
DEFAULT_EVAL_EVERY = 100


def has_val_split(data: PreparedData) -> bool:
    return bool(data.splits.get(VAL_SPLIT)) and data.num_tokens(VAL_SPLIT) > 0


def resolve_eval_every(requested: int | None, data: PreparedData) -> int:
    """``--eval-every`` as given, or by default every 100 steps when there is a val split."""
    if requested is None:
        return DEFAULT_EVAL_EVERY if has_val_split(data) else 0
    return requested


class ValidationSet:
    def __init__(self, data: PreparedData, *, seq_len: int, samples: int, batch: int) -> None:
        if not has_val_split(data):
            raise DataError(
                f"{data.path} has no {VAL_SPLIT!r} split to validate on; prepare the data with "
                "a val split (phalanx-data prepare --val-every N) or pass --eval-every 0"
            )
        self.windows = DistributedTokenLoader(
            data, seq_len=seq_len, micro_batch=1, seed=VAL_ORDER_SEED, split=VAL_SPLIT
        )
        self.samples = min(samples, self.windows.num_windows)
        self.seq_len, self.batch = seq_len, batch

    def loss_sum(
        self, model: nn.Module, rank: int, world_size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's summed token losses and token count (fp32, on ``device``)."""
        mine = list(range(rank, self.samples, world_size))
        per_rank = -(-self.samples // world_size)
        mine += [-1] * (per_rank - len(mine))  # padding: ignored targets
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        tokens = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, per_rank, self.batch):
            indices = mine[start : start + self.batch]
            rows = np.stack([self.windows.window(max(i, 0)) for i in indices]).astype(np.int64)
            batch = torch.from_numpy(rows).to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:].clone()
            padded = torch.tensor([i < 0 for i in indices], device=device)
            targets[padded] = IGNORE_INDEX
            counted = (targets != IGNORE_INDEX).sum().to(torch.float32)
            mean = model(inputs, targets=targets)
            loss_sum += mean.float() * counted
            tokens += counted
        return loss_sum, tokens
