"""Straggler detection: a rank whose step time stays above `factor` x the gang's median for
`failurePolicy.stragglers.windowSeconds` is a straggler. Pure.

The bound is relative to the gang's own median, so a job that is slow as a whole (a large
model, a slow interconnect) has no stragglers; only a rank that is slow next to its peers.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from phalanx.constants import LABEL_HOSTNAME

if TYPE_CHECKING:
    from .gang_progress import GangProgress

# A median over fewer ranks says nothing about which one is slow.
MIN_RANKS = 3


def slow_ranks(step_seconds: Mapping[int, float | None], factor: float) -> set[int]:
    """Ranks whose step time is above `factor` x the median of the ranks that report one."""
    known = {rank: s for rank, s in step_seconds.items() if s is not None and s > 0}
    if len(known) < MIN_RANKS:
        return set()
    median = statistics.median(known.values())
    return {rank for rank, seconds in known.items() if seconds > factor * median}


@dataclass(frozen=True)
class Straggler:
    rank: int
    pod: str
    node: str
    step_seconds: float
    median_seconds: float
    slow_for: float

    def describe(self) -> str:
        where = f" on node {self.node}" if self.node else ""
        return (
            f"rank {self.rank} (pod {self.pod}{where}) takes {self.step_seconds:.3g}s per step, "
            f"{self.step_seconds / self.median_seconds:.1f}x the gang's median "
            f"{self.median_seconds:.3g}s, for {self.slow_for:.0f}s"
        )

    def wire(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "pod": self.pod,
            "node": self.node,
            "stepSeconds": round(self.step_seconds, 4),
            "medianStepSeconds": round(self.median_seconds, 4),
        }


def find_stragglers(
    gang: GangProgress, window_seconds: float, now: datetime
) -> tuple[list[Straggler], float | None]:
    """The ranks slow for at least the window, and the seconds until the next slow rank
    would reach it (None: no rank is slow)."""
    known = [p.step_seconds for p in gang.ranks.values() if p.step_seconds is not None]
    if len(known) < MIN_RANKS:
        return [], None
    median = statistics.median(known)
    found: list[Straggler] = []
    waits: list[float] = []
    for rank in sorted(gang.ranks):
        p = gang.ranks[rank]
        if p.slow_since is None or p.step_seconds is None:
            continue
        slow_for = (now - p.slow_since).total_seconds()
        if slow_for >= window_seconds:
            found.append(Straggler(rank, p.pod, p.node, p.step_seconds, median, slow_for))
        else:
            waits.append(window_seconds - slow_for)
    return found, (min(waits) if waits else None)


def describe_all(stragglers: Sequence[Straggler], shown: int = 4) -> str:
    text = "; ".join(s.describe() for s in stragglers[:shown])
    more = len(stragglers) - shown
    return text + (f"; and {more} more" if more > 0 else "")


def avoid_nodes(pod: dict[str, Any], nodes: Sequence[str]) -> dict[str, Any]:
    """`pod` kept off `nodes` (nodes a straggler was replaced on) by a required node affinity
    term, ANDed into every term the pod already has (the terms themselves are ORed)."""
    if not nodes:
        return pod
    pod = copy.deepcopy(pod)  # the rendered pod may share dicts with the parsed spec
    rule = {"key": LABEL_HOSTNAME, "operator": "NotIn", "values": sorted(set(nodes))}
    spec = pod.setdefault("spec", {})
    required = (
        spec.setdefault("affinity", {})
        .setdefault("nodeAffinity", {})
        .setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    )
    terms = required.get("nodeSelectorTerms") or [{}]
    required["nodeSelectorTerms"] = [
        {**term, "matchExpressions": [*(term.get("matchExpressions") or []), rule]}
        for term in terms
    ]
    return pod
