"""Which `/progress` endpoints one poll round asks, within the poll budget. Pure: the shell
keeps the clock and the HTTP client (`handlers/progress.py`).

A round runs every poll interval and sends at most `budget x interval` requests (the budget
is `PHALANX_PROGRESS_BUDGET`, requests per second over every running gang). While every
rank of every gang fits, a round asks them all. When they do not, no rank is dropped: the
cycle in which every rank is asked once stretches over several rounds. Each round asks every
gang's rank 0 first (its answer is `status.progress`, and being asked every round keeps the
gang's newest step, and so hang detection, as current as the interval), then fills what is
left of the round with the ranks asked longest ago, ranks never asked first. That is a
rotation: with `n` endpoints, `g` of them rank 0, and `c` requests a round, every rank is
asked at least once every `ceil((n - g) / (c - g))` rounds (`cycle_rounds`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

LEADER_RANK = 0


@dataclass(frozen=True)
class PollTarget:
    """One rank's endpoint, and when that rank was last asked in its current gang."""

    gang: tuple[str, str]  # the job's (namespace, name)
    rank: int
    polled_at: datetime | None = None  # None: never asked in this gang

    @property
    def leader(self) -> bool:
        return self.rank == LEADER_RANK


def round_capacity(budget: float, interval: float) -> int:
    """Requests one round may send: the budget's worth of one interval, at least one."""
    # The epsilon keeps 0.3 x 10 at 3: the product of two decimals is not exact.
    return max(1, math.floor(budget * interval + 1e-9))


def _oldest_first(target: PollTarget) -> tuple[bool, float, tuple[str, str], int]:
    asked = target.polled_at
    return (asked is not None, asked.timestamp() if asked else 0.0, target.gang, target.rank)


def plan_round(targets: Sequence[PollTarget], capacity: int) -> list[PollTarget]:
    """The endpoints to ask this round, at most `capacity` of them, leaders first.

    Leaders are asked every round while they leave room for the other ranks; with as many
    gangs as a round has requests (a budget far too small for the cluster) every rank,
    leaders included, takes its turn instead, so the budget holds and no rank starves.
    """
    leaders = [t for t in targets if t.leader]
    if len(leaders) >= capacity:
        return sorted(targets, key=_oldest_first)[:capacity]
    others = sorted((t for t in targets if not t.leader), key=_oldest_first)
    return [*sorted(leaders, key=_oldest_first), *others[: capacity - len(leaders)]]


def cycle_rounds(endpoints: int, leaders: int, capacity: int) -> int:
    """Rounds in which every one of `endpoints` is asked at least once (at least one)."""
    if endpoints <= capacity:
        return 1
    if leaders >= capacity:  # leaders rotate with everyone else
        return math.ceil(endpoints / capacity)
    return math.ceil((endpoints - leaders) / (capacity - leaders))
