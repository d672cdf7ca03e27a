"""What every rank of a job's current gang last reported on `/progress`, and when its step last
moved: the input of hang and straggler detection and of the goodput timeline. Pure: the
shell polls, this module folds one poll into the previous picture.

A poll round need not ask every rank: under the poll budget (`plan.poll_budget`) a large gang's
ranks are asked over several rounds. Each rank therefore keeps when it was last asked
(`polled_at`) beside when it last answered (`answered_at`): a rank is silent when it did not
answer its own newest poll, never merely because another rank was asked more recently.

A pod runs `processesPerNode` ranks, each serving its own endpoint on the metrics port plus
its local rank (docs/progress-contract.md); rank `r` of pod `p` is global rank
`p * processesPerNode + r`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from .straggler import slow_ranks

# Seconds between moves of the gang's step kept for the median (the newest ones).
KEPT_INTERVALS = 32


@dataclass(frozen=True)
class RankAnswer:
    """One rank's answer to one poll (`report` None: no answer, an error or not JSON)."""

    rank: int
    pod: str
    node: str
    report: Mapping[str, Any] | None


@dataclass(frozen=True)
class RankProgress:
    rank: int
    pod: str
    node: str
    step: int | None = None
    first_step: int | None = None
    # The rank's own seconds per step: `ownStepSeconds` (its work before it waits for its
    # peers) where the trainer reports it, else its wall time `stepSeconds`, in which every
    # rank of a synchronous gang waits for the slowest.
    step_seconds: float | None = None
    answered_at: datetime | None = None
    # When this rank was last asked (answered or not); None: not yet asked. With the poll
    # cycle stretched over several rounds this is older than the gang's newest poll.
    polled_at: datetime | None = None
    # Since when this rank's step time has been above the straggler bound (None: it is not).
    slow_since: datetime | None = None


@dataclass(frozen=True)
class GangProgress:
    generation: int
    ranks: Mapping[int, RankProgress] = field(default_factory=dict)
    # When the gang's newest step was first seen at its current value.
    stepped_at: datetime | None = None
    # Whether any rank's step moved since this gang was first polled (it trains).
    advanced: bool = False
    intervals: tuple[float, ...] = ()
    leader: Mapping[str, Any] | None = None  # rank 0's latest report
    polled_at: datetime | None = None  # the newest poll of any of its ranks

    @property
    def step(self) -> int | None:
        steps = [r.step for r in self.ranks.values() if r.step is not None]
        return max(steps) if steps else None

    def signature(self) -> tuple[Any, ...]:
        """What a reconcile acts on: a poll that leaves it equal needs no pass."""
        return (
            self.generation,
            self.leader,
            tuple(
                (r.rank, r.step, r.answered_at is not None, r.slow_since is not None)
                for r in sorted(self.ranks.values(), key=lambda r: r.rank)
            ),
        )

    def silent(self, rank: int) -> bool:
        """Whether `rank` did not answer the newest poll it was asked in (or was never
        heard from). A rank not asked since its last answer is not silent."""
        p = self.ranks[rank]
        return p.answered_at is None or (p.polled_at is not None and p.answered_at < p.polled_at)


def report_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def report_number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def report_seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def vanished(
    previous: GangProgress | None, generation: int, present: Iterable[int]
) -> list[RankAnswer]:
    """Known ranks of the gang with no endpoint now (their pod went, or lost its address),
    as answers of ranks that were asked and did not answer: nothing is sent to them, yet they
    are silent, not merely waiting for their turn."""
    if previous is None or previous.generation != generation:
        return []
    here = set(present)
    return [
        RankAnswer(rank, p.pod, p.node, None)
        for rank, p in sorted(previous.ranks.items())
        if rank not in here
    ]


def observe_gang(
    previous: GangProgress | None,
    generation: int,
    answers: Iterable[RankAnswer],
    now: datetime,
    straggler_factor: float,
) -> GangProgress:
    """The gang's picture after one poll round: `answers` holds the ranks asked in it (every
    rank, or a share of them when the cycle is stretched); the others keep what they last
    reported, and when."""
    if previous is None or previous.generation != generation:
        previous = GangProgress(generation)
    ranks = dict(previous.ranks)
    leader = previous.leader
    for answer in answers:
        known = ranks.get(answer.rank) or RankProgress(answer.rank, answer.pod, answer.node)
        known = replace(known, pod=answer.pod, node=answer.node, polled_at=now)
        report = answer.report
        if report is not None:
            step = report_int(report.get("step"))
            known = replace(
                known,
                step=step if step is not None else known.step,
                first_step=known.first_step if known.first_step is not None else step,
                step_seconds=report_seconds(report.get("ownStepSeconds"))
                or report_seconds(report.get("stepSeconds")),
                answered_at=now,
            )
            if answer.rank == 0:
                leader = dict(report)
        ranks[answer.rank] = known
    slow = slow_ranks({r: p.step_seconds for r, p in ranks.items()}, straggler_factor)
    ranks = {
        r: replace(p, slow_since=(p.slow_since or now) if r in slow else None)
        for r, p in ranks.items()
    }
    gang = replace(previous, ranks=ranks, leader=leader, polled_at=now)
    step, before = gang.step, previous.step
    if step is not None and step != before:
        intervals = previous.intervals
        if before is not None and previous.stepped_at is not None:
            # A move seen after an earlier one: how long the step took to move, as polled.
            waited = (now - previous.stepped_at).total_seconds()
            intervals = (*intervals, waited)[-KEPT_INTERVALS:]
        gang = replace(gang, stepped_at=now, intervals=intervals)
    moved = any(
        p.step is not None and p.first_step is not None and p.step != p.first_step
        for p in ranks.values()
    )
    return replace(gang, advanced=previous.advanced or moved)
