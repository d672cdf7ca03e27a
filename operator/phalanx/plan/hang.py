"""Hang detection: a training gang whose step stops moving for longer than its hang timeout is
treated as a failed rank (reason `Hang`), so failurePolicy decides, by default a gang restart.
Pure.

The timeout is `failurePolicy.hangTimeoutSeconds`, or derived from the gang's own pace:
HANG_FACTOR x the median time between observed moves of its step, at least
HANG_FLOOR_SECONDS, once MIN_INTERVALS moves were timed (before that only an explicit
timeout applies: one slow first interval must not read as a hang). Only a gang seen to
train counts: a gang stuck before its first step is the gang timeout's business.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime

from phalanx.constants import Reason

from .failure_policy import RankFailure
from .gang_progress import GangProgress

HANG_FACTOR = 10.0
# Above the longest checkpoint save we expect without a configured timeout, and below
# PyTorch's default collective timeout (10 minutes), which would end the ranks anyway.
HANG_FLOOR_SECONDS = 300.0
MIN_INTERVALS = 3


def hang_timeout(explicit: int | None, gang: GangProgress) -> float | None:
    """The timeout in force, or None while none is (no explicit one, too few moves timed)."""
    if explicit is not None:
        return float(explicit)
    if len(gang.intervals) < MIN_INTERVALS:
        return None
    return max(HANG_FLOOR_SECONDS, HANG_FACTOR * statistics.median(gang.intervals))


@dataclass(frozen=True)
class Hang:
    step: int
    stalled_seconds: float
    timeout_seconds: float
    explicit: bool
    # Ranks that did not answer their newest poll, or are behind the gang's newest step.
    silent: tuple[int, ...]
    everyone: bool  # every rank answers, stopped at the same step

    def describe(self, gang: GangProgress, shown: int = 8) -> str:
        source = "failurePolicy.hangTimeoutSeconds" if self.explicit else "derived hang timeout"
        names = []
        for rank in self.silent[:shown]:
            p = gang.ranks[rank]
            where = f" on node {p.node}" if p.node else ""
            names.append(f"{rank} (pod {p.pod}{where})")
        more = len(self.silent) - shown
        listed = ", ".join(names) + (f" and {more} more" if more > 0 else "")
        who = (
            f"every rank answers but none moved: {listed}"
            if self.everyone
            else f"silent ranks {listed}"
        )
        return (
            f"the step stayed at {self.step} for {self.stalled_seconds:.0f}s "
            f"({source} {self.timeout_seconds:.0f}s); {who}"
        )


def find_hang(
    gang: GangProgress | None, explicit: int | None, now: datetime
) -> tuple[Hang | None, float | None]:
    """The hang, or None and the seconds until the gang would count as hung (None: never)."""
    if gang is None or not gang.advanced or gang.stepped_at is None:
        return None, None
    timeout = hang_timeout(explicit, gang)
    step = gang.step
    if timeout is None or step is None:
        return None, None
    stalled = (now - gang.stepped_at).total_seconds()
    if stalled < timeout:
        return None, timeout - stalled
    silent = tuple(
        rank
        for rank, p in sorted(gang.ranks.items())
        # Silent by the rank's own newest poll: in a stretched cycle a rank not yet asked
        # again keeps its last answer and is not silent for it.
        if gang.silent(rank) or p.step is None or p.step < step
    )
    everyone = not silent
    return Hang(
        step, stalled, timeout, explicit is not None, silent or tuple(sorted(gang.ranks)), everyone
    ), None


def hang_failure(hang: Hang, gang: GangProgress, processes_per_node: int) -> RankFailure:
    """The hang as the failure of its first silent rank's pod, for the failure rules."""
    first = gang.ranks[hang.silent[0]]
    return RankFailure(
        first.rank // max(1, processes_per_node),
        first.pod,
        first.node,
        None,
        (Reason.HANG,),
        hang.describe(gang),
    )
