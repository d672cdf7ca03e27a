"""Why a queued gang waits, and until when: its place in the admission queue and an estimated
start, from the running jobs' reported ETAs and the placement engine. Pure.

The estimate replays admission on the snapshots the cluster would have once the running jobs
finish, soonest first: the first of those in which the gang is placed (behind every gang
ahead of it, which are placed first, as admission would) gives its start. A gang that fits
none of them has no estimate: it waits for a job that reports no ETA, for capacity that is
not there, or for jobs not yet running.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from phalanx.placement import CapacitySnapshot, GangRequest, Placement, Topology, admit
from phalanx.placement.queue import queue_order


@dataclass(frozen=True)
class Finish:
    """A running job expected to end `seconds` from now (its reported etaSeconds)."""

    job: str  # namespace/name
    seconds: float


@dataclass(frozen=True)
class Wait:
    position: int  # 1: next in line
    start: datetime | None = None  # estimated; None: not within the known ETAs
    after: str | None = None  # the finishing job that lets it in

    def describe(self, now: datetime) -> str:
        where = f"Position {self.position} in the admission queue"
        if self.start is None:
            return f"{where}; no start estimate (no running job's ETA frees enough capacity)."
        seconds = (self.start - now).total_seconds()
        return f"{where}; estimated start in {human(seconds)}, when {self.after} finishes."

    def wire(self) -> dict[str, object]:
        """status.queue (the start as an absolute time, so it stays put between estimates)."""
        out: dict[str, object] = {"position": self.position}
        if self.start is not None:
            out["estimatedStartTime"] = self.start.strftime("%Y-%m-%dT%H:%M:%SZ")
            out["after"] = self.after
        return out


def human(seconds: float) -> str:
    """A coarse duration for people: the estimate is no finer than the ETAs it comes from."""
    if seconds < 90:
        return f"~{max(1, round(seconds))}s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)}m"
    return f"~{seconds / 3600:.1f}h"


def estimate_waits(
    queued: Sequence[GangRequest],
    futures: Sequence[tuple[Finish, CapacitySnapshot]],
    topology: Topology,
    now: datetime,
    total: CapacitySnapshot | None = None,
) -> dict[str, Wait]:
    """A Wait for every queued gang. `futures` are (a finish, the snapshot once it and every
    earlier one ended), soonest first."""
    ordered = queue_order(queued)
    position = {request.key: index + 1 for index, request in enumerate(ordered)}
    waits: dict[str, Wait] = {}
    for finish, snapshot in futures:
        pending = [r for r in ordered if r.key not in waits]
        if not pending:
            break
        placed = {
            request.key
            for request, decision in admit(snapshot, ordered, topology, total)
            if isinstance(decision, Placement)
        }
        for request in pending:
            if request.key in placed:
                start = now + timedelta(seconds=max(0.0, finish.seconds))
                waits[request.key] = Wait(position[request.key], start, finish.job)
    return {r.key: waits.get(r.key) or Wait(position[r.key]) for r in ordered}
