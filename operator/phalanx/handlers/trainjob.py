"""Reconcile one LLMTrainJob: read the cache, ask `lifecycle.plan_trainjob`, apply the plan.

The recipe: parse the spec (a bad spec becomes a condition, never a crash), ensure the
Service and checkpoint claim exist, delete and create pods as planned, write status once, and
send events only after that write succeeded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import Any

from phalanx import kube, metrics
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError, parse
from phalanx.constants import TRAINJOB_PLURAL
from phalanx.observe import CreateRejection
from phalanx.plan.trainjob import Plan, World, plan_trainjob
from phalanx.render.trainjob import (
    JobRef,
    hccl_configmap_name,
    render_checkpoint_claim,
    render_hccl_configmap,
    render_pod_group,
    render_service,
)
from phalanx.status import ADMITTED, set_condition, status_patch

from .state import Key, Obj, Operator, run_reconcile

log = logging.getLogger("phalanx.trainjob")
CONTROLLER = "llmtrainjob"


async def reconcile(op: Operator, key: Key) -> None:
    await run_reconcile(CONTROLLER, "LLMTrainJob", op.trainjobs, key, lambda: _reconcile(op, key))


async def _reconcile(op: Operator, key: Key) -> None:
    obj = op.cache.trainjobs.get(key)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        op.verdicts.pop(key, None)
        op.progress.pop(key, None)
        op.rejections.pop(key, None)
        return
    now = op.clock()
    meta = obj["metadata"]
    status = dict(obj.get("status") or {})
    try:
        job: LLMTrainJob = parse(obj, LLMTrainJob)
    except SpecError as error:
        await _report_invalid(op, obj, status, str(error), now)
        return
    ref = JobRef(meta["name"], meta["namespace"], meta["uid"])
    await _ensure_children(op, ref, job)
    world = World(
        pods=op.cache.pods_of_job(key),
        ready_nodes=op.cache.ready_nodes(),
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
    wait = op.cache.seconds_until_lost(str(p["spec"].get("nodeName") or "") for p in world.pods)
    if wait is not None:
        op.trainjobs.add_after(key, wait + 0.5)


async def _ensure_children(op: Operator, ref: JobRef, job: LLMTrainJob) -> None:
    """Create the Service, claim, PodGroup and rank-table ConfigMap once per job."""
    wanted = [
        render_service(ref, job.spec),
        render_checkpoint_claim(ref, job.spec),
        render_pod_group(ref, job.spec),
    ]
    if job.spec.backend() == "hccl":
        wanted.append(
            render_hccl_configmap(
                ref,
                {
                    "status": "initializing",
                    "version": "1.0",
                    "server_count": "0",
                    "server_list": [],
                },
            )
        )
    for child in wanted:
        if child is None:
            continue
        marker = (ref.uid, f"{child['kind']}/{child['metadata']['name']}")
        if marker in op.ensured:
            continue
        await asyncio.to_thread(kube.create, child)
        op.ensured.add(marker)


async def _apply(
    op: Operator, key: Key, obj: Obj, old_status: dict[str, Any], plan: Plan, now: datetime
) -> None:
    namespace = key[0]
    for name, force in [
        *((n, False) for n in plan.delete),
        *((n, True) for n in plan.force_delete),
    ]:
        pod = await asyncio.to_thread(kube.delete_pod, namespace, name, force)
        if pod is not None and pod["metadata"].get("deletionTimestamp") and not force:
            op.cache.put_pod(pod)  # terminating gracefully: it still holds its node
        elif (stale := op.cache.pods.get((namespace, name))) is not None:
            op.cache.drop_pod(stale)  # gone at once: forget it now
    created = await create_all(op, plan.create)
    if plan.create:
        op.wake_admission()
    if not record_rejection(op.rejections, key, created, obj, now):
        # Re-plan at once: the next pass reports the refusal and waits out its backoff.
        op.trainjobs.add(key)
        return
    if plan.hccl_table is not None:
        data = {"hccl.json": json.dumps(plan.hccl_table, indent=2, sort_keys=True)}
        marker = (obj["metadata"]["uid"], f"hccl:{data['hccl.json']}")
        if marker not in op.ensured:
            await asyncio.to_thread(
                kube.replace_configmap_data, namespace, hccl_configmap_name(key[1]), data
            )
            op.ensured.add(marker)
    patch = status_patch(old_status, plan.status)
    if patch:
        updated = await asyncio.to_thread(
            kube.patch_status, TRAINJOB_PLURAL, namespace, key[1], patch
        )
        if updated is None:
            return
        op.cache.trainjobs.put(updated)
        _count_transitions(old_status, plan.status)
        for kind, reason, message in plan.events:
            await asyncio.to_thread(kube.event, obj, kind, reason, message)
    if plan.delete_job:
        await asyncio.to_thread(kube.delete_custom, TRAINJOB_PLURAL, namespace, key[1])
        return
    if plan.requeue_after is not None:
        op.trainjobs.add_after(key, plan.requeue_after)
    if plan.delete or plan.force_delete:
        op.wake_admission()  # freed capacity may admit a waiting gang


async def create_all(op: Operator, objects: list[dict[str, Any]]) -> list[Obj | kube.Rejected]:
    """Create pods side by side; each answer goes into the cache, each refusal is returned."""
    results = await asyncio.gather(
        *(asyncio.to_thread(kube.create, o) for o in objects), return_exceptions=True
    )
    answers: list[Obj | kube.Rejected] = []
    for result in results:
        if isinstance(result, kube.Rejected):
            answers.append(result)
        elif isinstance(result, BaseException):
            raise result
        elif result is not None:
            op.cache.put_pod(result)
            answers.append(result)
    return answers


def record_rejection(
    rejections: dict[Key, CreateRejection],
    key: Key,
    answers: list[Obj | kube.Rejected],
    owner: Obj,
    now: datetime,
) -> bool:
    """Remember the API server's refusal (counting attempts); True when nothing was refused."""
    refused = [a for a in answers if isinstance(a, kube.Rejected)]
    if not refused:
        if answers:
            rejections.pop(key, None)
        return True
    first = refused[0]
    generation = owner["metadata"].get("generation")
    previous = rejections.get(key)
    attempts = previous.attempts + 1 if previous and previous.generation == generation else 1
    rejections[key] = CreateRejection(
        object=f"{first.kind} {first.name}",
        code=first.code,
        message=first.message,
        attempts=attempts,
        at=now,
        generation=generation,
    )
    log.warning("%s/%s: %s (attempt %d)", *key, first, attempts)
    return False


def _count_transitions(old: dict[str, Any], new: dict[str, Any]) -> None:
    if int(new.get("restarts") or 0) > int(old.get("restarts") or 0):
        metrics.RESTARTS.inc(int(new.get("restarts") or 0) - int(old.get("restarts") or 0))


async def _report_invalid(
    op: Operator, obj: Obj, status: dict[str, Any], message: str, now: datetime
) -> None:
    """A spec the API server accepted but the operator cannot run (e.g. an older CRD)."""
    conditions, changed = set_condition(
        status.get("conditions") or [], ADMITTED, False, "InvalidSpec",
        f"The spec is invalid: {message}. Fix the spec; nothing was created.", now,
        obj["metadata"].get("generation"),
    )  # fmt: skip
    if not changed and status.get("phase") == "Invalid":
        return
    new = {
        **status,
        "conditions": conditions,
        "phase": "Invalid",
        "observedGeneration": obj["metadata"].get("generation"),
    }
    updated = await asyncio.to_thread(
        kube.patch_status,
        TRAINJOB_PLURAL,
        obj["metadata"]["namespace"],
        obj["metadata"]["name"],
        status_patch(status, new),
    )
    if updated is not None:
        op.cache.trainjobs.put(updated)
        await asyncio.to_thread(kube.event, obj, "Warning", "InvalidSpec", message)


def phase_counts(op: Operator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in op.cache.trainjobs.values():
        phase = (job.get("status") or {}).get("phase") or "Pending"
        counts[phase] = counts.get(phase, 0) + 1
    return counts
