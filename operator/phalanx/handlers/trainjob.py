"""Reconcile one LLMTrainJob: read the cache, ask `plan.trainjob.plan_trainjob`, apply the plan.

The recipe: parse the spec (a bad spec becomes a condition, never a crash), plan, apply the
children, delete and create pods as planned, write status once, and send events only after
that write succeeded (`handlers.apply`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from phalanx import kube, metrics, observe
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError
from phalanx.constants import TRAINJOB_PLURAL
from phalanx.plan.trainjob import Plan, World, plan_trainjob
from phalanx.render.trainjob import JobRef
from phalanx.status import ADMITTED

from .apply import (
    apply_children,
    create_pods,
    delete_pods,
    record_rejection,
    report_invalid,
    requeue,
    write_status,
)
from .state import Key, Obj, Operator, run_reconcile

log = logging.getLogger("phalanx.trainjob")
CONTROLLER = "llmtrainjob"


async def reconcile(op: Operator, key: Key) -> None:
    await run_reconcile(CONTROLLER, "LLMTrainJob", op.trainjobs, key, lambda: _reconcile(op, key))


async def _reconcile(op: Operator, key: Key) -> None:
    obj = op.cache.trainjobs.get(key)
    if obj is None or observe.terminating(obj):
        op.forget_trainjob(key, str((obj or {}).get("metadata", {}).get("uid") or ""))
        return
    now = op.clock()
    meta = obj["metadata"]
    status = dict(obj.get("status") or {})
    job = op.parsed(obj, LLMTrainJob)
    if isinstance(job, SpecError):
        error = job
        await report_invalid(
            TRAINJOB_PLURAL,
            op.cache.trainjobs,
            obj,
            ADMITTED,
            str(error),
            now,
            {"phase": "Invalid"},
        )
        return
    ref = JobRef(meta["name"], meta["namespace"], meta["uid"])
    world = World(
        pods=op.cache.pods_of_job(key),
        ready_nodes=op.cache.ready_nodes(now),
        verdict=op.verdicts.get(key),
        progress=op.progress.get(key),
        rejection=op.rejections.get(key),
    )
    plan = plan_trainjob(ref, job.spec, meta.get("generation"), status, world, now)
    log.debug(
        "%s/%s: phase %s, create %d, delete %d, requeue %s",
        *key, plan.status.get("phase"), len(plan.create), len(plan.delete), plan.requeue_after,
    )  # fmt: skip
    await _apply(op, key, obj, status, plan, now)
    # A rank on a node that just went NotReady is judged once the node's grace has run out.
    nodes = (str(p["spec"].get("nodeName") or "") for p in world.pods)
    wait = op.cache.seconds_until_lost(nodes, now)
    if wait is not None:
        op.trainjobs.add_after(key, wait + 0.5)


async def _apply(
    op: Operator, key: Key, obj: Obj, old_status: dict[str, Any], plan: Plan, now: datetime
) -> None:
    await apply_children(op, obj, plan.children)
    await delete_pods(op, key[0], plan.delete, plan.force_delete)
    created = await create_pods(op, plan.create)
    if plan.create:
        op.wake_admission()
    if not record_rejection(op.rejections, key, created, obj, now):
        # Re-plan at once: the next pass reports the refusal and waits out its backoff.
        op.trainjobs.add(key)
        return
    written = await write_status(
        TRAINJOB_PLURAL, op.cache.trainjobs, obj, old_status, plan.status, plan.events
    )
    if not written:
        return
    _count_transitions(old_status, plan.status)
    if plan.delete_job:
        await asyncio.to_thread(kube.delete_custom, TRAINJOB_PLURAL, key[0], key[1])
        return
    requeue(op.trainjobs, key, plan.requeue_after)
    if plan.delete or plan.force_delete:
        op.wake_admission()  # freed capacity may admit a waiting gang


def _count_transitions(old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    if int(new.get("restarts") or 0) > int(old.get("restarts") or 0):
        metrics.RESTARTS.inc(int(new.get("restarts") or 0) - int(old.get("restarts") or 0))


def phase_counts(op: Operator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in op.cache.trainjobs.values():
        phase = (job.get("status") or {}).get("phase") or "Pending"
        counts[phase] = counts.get(phase, 0) + 1
    return counts
