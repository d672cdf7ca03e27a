"""Estimated starts of queued gangs (`plan.queue_wait`), refreshed by the admission loop at
most every REFRESH_SECONDS: the cluster as it would be once the running jobs that report an
ETA finish, soonest first, one snapshot per finish."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from phalanx import observe
from phalanx.constants import LABEL_JOB
from phalanx.placement import CapacitySnapshot, GangRequest, Topology
from phalanx.plan.queue_wait import Finish, estimate_waits
from phalanx.status import RUNNING, is_true

from .state import Key, Obj, Operator

REFRESH_SECONDS = 30.0
# Each finish costs one snapshot and one admission replay; later ones rarely matter.
MAX_FINISHES = 8


def finishes(op: Operator) -> list[tuple[Finish, Key]]:
    """Running train jobs that report an ETA, soonest first."""
    found = []
    for key, job in list(op.cache.trainjobs.items.items()):
        status = job.get("status") or {}
        eta = (status.get("progress") or {}).get("etaSeconds")
        if not is_true(status.get("conditions") or [], RUNNING):
            continue
        if isinstance(eta, int | float) and not isinstance(eta, bool) and eta >= 0:
            found.append((Finish(f"{key[0]}/{key[1]}", float(eta)), key))
    return sorted(found, key=lambda f: (f[0].seconds, f[0].job))[:MAX_FINISHES]


def _futures(
    nodes: Sequence[Obj], pods: Sequence[Obj], ends: Sequence[tuple[Finish, Key]]
) -> list[tuple[Finish, CapacitySnapshot]]:
    futures = []
    gone: set[Key] = set()
    for finish, key in ends:
        gone.add(key)
        kept = [
            p
            for p in pods
            if (p["metadata"].get("namespace"), observe.labels(p).get(LABEL_JOB)) not in gone
        ]
        futures.append((finish, CapacitySnapshot.from_objects(nodes, kept)))
    return futures


async def refresh(
    op: Operator,
    nodes: Sequence[Obj],
    pods: Sequence[Obj],
    queued: Sequence[GangRequest],
    topology: Topology,
    total: CapacitySnapshot | None,
) -> None:
    """Recompute `op.waits` for the queued gangs, unless it was done recently."""
    now = op.clock()
    if now.timestamp() - op.waits_at < REFRESH_SECONDS and set(op.waits) >= {r.key for r in queued}:
        return
    op.waits_at = now.timestamp()
    ends = finishes(op)

    def compute() -> Any:
        return estimate_waits(queued, _futures(nodes, pods, ends), topology, now, total)

    op.waits = await asyncio.to_thread(compute) if queued else {}
    if queued and (op.waits_timer is None or op.waits_timer.cancelled()):
        # ETAs move while nothing else happens: look again, so the estimate stays current.
        op.waits_timer = asyncio.get_running_loop().call_later(REFRESH_SECONDS + 0.5, _wake, op)


def _wake(op: Operator) -> None:
    op.waits_timer = None
    op.wake_admission()
