"""Reconcile one LLMTrainJob: read the cache, ask `plan.trainjob.plan_trainjob`, apply the plan.

The recipe: parse the spec (a bad spec becomes a condition, never a crash), plan, apply the
children, delete and create pods as planned, write status once, and send events only after
that write succeeded (`handlers.apply`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from phalanx import kube, metrics, observe
from phalanx.api.pod_security import refusal_message, refused
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError
from phalanx.constants import LABEL_JOB, TRAINJOB_PLURAL, Reason
from phalanx.plan.trainjob import Plan, World, lost_ranks, plan_trainjob
from phalanx.render.trainjob import JobRef
from phalanx.status import ADMITTED, is_true

from .apply import (
    apply_children,
    create_pods,
    delete_pods,
    record_rejection,
    report_invalid,
    report_refused,
    requeue,
    write_status,
)
from .state import Key, Obj, Operator, run_reconcile

log = logging.getLogger("phalanx.trainjob")
CONTROLLER = "llmtrainjob"
FINISHED = ("Succeeded", "Failed")


async def reconcile(op: Operator, key: Key) -> None:
    await run_reconcile(CONTROLLER, "LLMTrainJob", op.trainjobs, key, lambda: _reconcile(op, key))


async def _reconcile(op: Operator, key: Key) -> None:
    obj = op.cache.trainjobs.get(key)
    if obj is None or op.cache.going(obj):
        op.forget_trainjob(key, str((obj or {}).get("metadata", {}).get("uid") or ""))
        with contextlib.suppress(KeyError):
            metrics.RESTARTS.remove(*key)
        metrics.forget_goodput(key)
        return
    # Exported from the first pass at 0, so a job's restart panel and alert have a series
    # before anything went wrong (an absent series reads as "no data", not as "none").
    metrics.RESTARTS.labels(*key)
    metrics.export_goodput(key)
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
    ref = JobRef(meta["name"], meta["namespace"], meta["uid"], op.cache.pod_security(key[0]))
    refusals = refused(job.spec.pod_template, ref.pod_security)
    if refusals and status.get("phase") not in FINISHED:
        # Pods already running keep running, as under a tightened Pod Security Admission
        # label; none is created or restarted until the template or the label changes.
        message = refusal_message(ref.namespace, ref.pod_security, refusals)
        await report_refused(
            TRAINJOB_PLURAL, op.cache.trainjobs, obj, ADMITTED, Reason.POD_SECURITY_LEVEL,
            message, now,
        )  # fmt: skip
        return
    grace = float(job.spec.failure_policy.node_lost_grace_seconds)
    pods = op.cache.pods_of_job(key)
    generation = int(status.get("gangGeneration") or 1)
    admitted = is_true(status.get("conditions") or [], ADMITTED)
    if lost_ranks(job.spec.nodes, generation, pods, admitted):
        # The cache says a rank of a running gang is gone; restarting costs the whole gang's
        # work, so the API server confirms it first (a late watch event, a create's 409).
        pods = await _confirm_pods(op, key)
    world = World(
        pods=pods,
        ready_nodes=op.cache.ready_nodes(
            now, grace, pods, (status.get("placement") or {}).get("nodes") or ()
        ),
        verdict=op.verdicts.get(key),
        progress=op.progress.get(key),
        rejection=op.rejections.get(key),
        topology=op.topology,
        gang=op.gangs.get(key),
        wait=op.waits.get(f"{key[0]}/{key[1]}"),
        claim_bound=op.cache.checkpoint_bound(key, job.spec),
        declined=op.declined.get(key) == generation,
    )
    plan = plan_trainjob(ref, job.spec, meta.get("generation"), status, world, now)
    log.debug(
        "%s/%s: phase %s, create %d, delete %d, requeue %s",
        *key, plan.status.get("phase"), len(plan.create), len(plan.delete), plan.requeue_after,
    )  # fmt: skip
    await _apply(op, key, obj, status, plan, now, world.pods)
    # A rank on a node that just went NotReady is judged once the node's grace has run out.
    nodes = (str(p["spec"].get("nodeName") or "") for p in world.pods)
    wait = op.cache.seconds_until_lost(nodes, now, grace)
    if wait is not None:
        op.trainjobs.add_after(key, wait + 0.5)


async def _confirm_pods(op: Operator, key: Key) -> list[Obj]:
    listed = await asyncio.to_thread(kube.list_pods, key[0], f"{LABEL_JOB}={key[1]}")
    for pod in listed:
        op.cache.put_pod(pod)
    return op.cache.pods_of_job(key)


def _new_gang(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return int(new.get("gangGeneration") or 1) != int(old.get("gangGeneration") or 1)


async def _apply(
    op: Operator,
    key: Key,
    obj: Obj,
    old_status: dict[str, Any],
    plan: Plan,
    now: datetime,
    seen: Sequence[Mapping[str, Any]],
) -> None:
    await apply_children(op, obj, plan.children)
    status_from: Mapping[str, Any] = old_status
    events = plan.events
    if _new_gang(old_status, plan.status):
        # The intent (new generation, restart count) is written before any pod is deleted: an
        # operator killed in between then finds the old gang to remove, never a half-deleted
        # gang of the current generation to complete (mixing incarnations, the restart lost).
        if not await write_status(
            TRAINJOB_PLURAL, op.cache.trainjobs, obj, old_status, plan.status, plan.events
        ):
            return
        status_from, events = plan.status, []
    await delete_pods(op, key[0], plan.delete, plan.force_delete, seen)
    created = await create_pods(op, plan.create)
    if plan.wants_placement or any(observe.gated(p) for p in plan.create):
        op.wake_admission()  # a gang to place, or gated pods to release; bound ones are placed
    if not record_rejection(op.rejections, key, created, obj, now):
        # Re-plan at once: the next pass reports the refusal and waits out its backoff.
        op.trainjobs.add(key)
        return
    written = await write_status(
        TRAINJOB_PLURAL, op.cache.trainjobs, obj, status_from, plan.status, events
    )
    if not written:
        return
    _count_transitions(key, old_status, plan.status)
    if plan.delete_job:
        await asyncio.to_thread(kube.delete_custom, TRAINJOB_PLURAL, key[0], key[1])
        return
    requeue(op.trainjobs, key, plan.requeue_after)
    if plan.delete or plan.force_delete:
        op.wake_admission()  # freed capacity may admit a waiting gang


def _count_transitions(key: Key, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    added = int(new.get("restarts") or 0) - int(old.get("restarts") or 0)
    if added > 0:
        metrics.RESTARTS.labels(*key).inc(added)
    metrics.count_goodput(key, old.get("goodput") or {}, new.get("goodput") or {})
    metrics.STRAGGLERS.labels(*key).set(len(new.get("stragglers") or []))


def phase_counts(op: Operator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in op.cache.trainjobs.values():
        phase = (job.get("status") or {}).get("phase") or "Pending"
        counts[phase] = counts.get(phase, 0) + 1
    return counts
