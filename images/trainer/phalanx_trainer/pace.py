"""A rank's own pace: how long its share of a step takes before it waits for its peers.

In synchronous data parallelism a step ends on every rank when the slowest rank's gradients
are in, so every rank's wall time per step is the slowest rank's: it cannot tell which rank
is slow. DDP hands each gradient bucket to a communication hook the moment this rank has
computed it, and all-reduces it in the background while backward goes on; only after the
last bucket does the rank wait for its peers. The time from a step's start to its last
bucket is therefore this rank's own work (data, forward, backward), with none of the wait:
a rank on a slow device, a throttled CPU or a slow input pipeline shows it alone.

On CUDA the hook runs on the host ahead of the device, so the times are CUDA events on the
current stream, read at the end of an interval (one synchronisation per interval, not per
step). Under FSDP2 and tensor parallelism the waits are spread over every layer's
all-gather, where no hook sees them: there the pace is unknown (None) and readers fall back
to the wall time per step.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel


class _Clock:
    """Host time on CPU, CUDA events on a GPU's current stream."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return float(end - start)
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000.0


class OwnPace:
    """Times each step from its start to this rank's last gradient bucket."""

    def __init__(self, device: torch.device) -> None:
        self._clock = _Clock(device)
        self._start: Any = None
        self._last_bucket: Any = None
        self._steps: list[tuple[Any, Any]] = []

    def start_step(self) -> None:
        self._start, self._last_bucket = self._clock.mark(), None

    def bucket_ready(self) -> None:
        self._last_bucket = self._clock.mark()

    def end_step(self) -> None:
        """Keep the step's times; a step that synchronised no gradients (no hook) has none."""
        if self._start is not None and self._last_bucket is not None:
            self._steps.append((self._start, self._last_bucket))
        self._start = self._last_bucket = None

    def interval_seconds(self) -> float | None:
        """Mean own seconds per step since the last call; None when no step was timed."""
        steps, self._steps = self._steps, []
        if not steps:
            return None
        return sum(self._clock.seconds(start, end) for start, end in steps) / len(steps)


def time_gradient_buckets(module: torch.nn.Module, pace: OwnPace) -> bool:
    """Have DDP report each bucket to `pace` before all-reducing it as DDP's own hook does
    (divide by the world size, sum). False where there is no DDP to hook."""
    if not isinstance(module, DistributedDataParallel):
        return False

    def hook(state: object, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
        pace.bucket_ready()
        return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

    # DDP checks the hook's annotations as objects; this module's are strings (PEP 563).
    hook.__annotations__ |= {"bucket": GradBucket, "return": torch.futures.Future[torch.Tensor]}
    module.register_comm_hook(None, hook)
    return True
