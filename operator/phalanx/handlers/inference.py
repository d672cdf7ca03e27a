"""Reconcile one InferenceService: read the cache, ask `plan.inference.plan_service`,
apply the plan.

The recipe: parse the spec (a bad spec becomes a condition, never a crash), resolve the
model, ask the autoscaler, plan, apply both Services, delete and create pods as planned, write
status once, send events only after that write succeeded (`handlers.apply`), then move
spec.replicas through the scale subresource when the autoscaler decided so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from phalanx import kube, metrics, observe
from phalanx.api.inference import InferenceService, InferenceServiceSpec
from phalanx.api.pod_security import refusal_message, refused
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError
from phalanx.constants import INFERENCE_PLURAL, Reason
from phalanx.plan.autoscale import recommend
from phalanx.plan.inference import ServicePlan, ServiceWorld, plan_service
from phalanx.plan.model_source import resolve_model
from phalanx.render.inference import ServiceRef
from phalanx.status import READY

from .apply import (
    apply_children,
    create_pods,
    delete_pods,
    record_rejection,
    report_invalid,
    report_refused,
    write_status,
)
from .state import Key, Obj, Operator, run_reconcile

log = logging.getLogger("phalanx.inference")
CONTROLLER = "inferenceservice"
AUTOSCALER_DIRECTIONS = ("up", "down")


async def reconcile(op: Operator, key: Key) -> None:
    await run_reconcile(
        CONTROLLER, "InferenceService", op.services, key, lambda: _reconcile(op, key)
    )


def forget(op: Operator, key: Key, uid: str) -> None:
    """Drop what the operator holds for a deleted service (its pods go with the owner)."""
    op.forget_service(key, uid)
    for kind in ("desired", "ready"):
        with contextlib.suppress(KeyError):
            metrics.INFERENCE_REPLICAS.remove(*key, kind)
    for direction in AUTOSCALER_DIRECTIONS:
        with contextlib.suppress(KeyError):
            metrics.AUTOSCALER_DECISIONS.remove(*key, direction)


async def _reconcile(op: Operator, key: Key) -> None:
    obj = op.cache.services.get(key)
    if obj is None or op.cache.going(obj):
        forget(op, key, str((obj or {}).get("metadata", {}).get("uid") or ""))
        return
    now = op.clock()
    meta = obj["metadata"]
    status = dict(obj.get("status") or {})
    service = op.parsed(obj, InferenceService)
    if isinstance(service, SpecError):
        error = service
        await report_invalid(INFERENCE_PLURAL, op.cache.services, obj, READY, str(error), now)
        return
    spec = service.spec
    ref = ServiceRef(meta["name"], meta["namespace"], meta["uid"], op.cache.pod_security(key[0]))
    refusals = refused(spec.pod_template, ref.pod_security)
    if refusals:
        # Running pods are left as they are; none is created until the template or the
        # namespace's label changes.
        message = refusal_message(ref.namespace, ref.pod_security, refusals)
        await report_refused(
            INFERENCE_PLURAL, op.cache.services, obj, READY, Reason.POD_SECURITY_LEVEL,
            message, now,
        )  # fmt: skip
        return
    source = spec.model.from_train_job
    job = op.cache.trainjobs.get((key[0], source.name)) if source is not None else None
    trainjob = op.parsed(job, LLMTrainJob) if job is not None else None
    status = (job or {}).get("status") or {}
    model = resolve_model(spec, trainjob, status, op.cache.claim_names(key[0]))
    decision = None
    if spec.autoscaling is not None:
        decision = recommend(op.samples.get(key, []), spec.autoscaling, spec.replicas, now)
    pods = op.cache.pods_of_service(key)
    world = ServiceWorld(
        pods=pods,
        ready_nodes=op.cache.ready_nodes(now, pods=pods),
        model=model,
        verdict=op.service_verdicts.get(key),
        decision=decision,
        rejection=op.service_rejections.get(key),
    )
    plan = plan_service(ref, spec, meta.get("generation"), status, world, now)
    await _apply(op, key, obj, status, plan, spec, now, world.pods)


async def _apply(
    op: Operator,
    key: Key,
    obj: Obj,
    old_status: dict[str, Any],
    plan: ServicePlan,
    spec: InferenceServiceSpec,
    now: datetime,
    pods: Sequence[Mapping[str, Any]],
) -> None:
    await apply_children(op, obj, plan.children)
    await delete_pods(op, key[0], plan.delete, seen=pods)
    created = await create_pods(op, plan.create)
    if plan.delete or any(observe.gated(p) for p in plan.create):
        op.wake_admission()
    if not record_rejection(op.service_rejections, key, created, obj, now):
        op.services.add(key)  # the next pass reports the refusal and waits out its backoff
        return
    written = await write_status(
        INFERENCE_PLURAL, op.cache.services, obj, old_status, plan.status, plan.events
    )
    if not written:
        return
    metrics.INFERENCE_REPLICAS.labels(*key, "desired").set(spec.replicas)
    metrics.INFERENCE_REPLICAS.labels(*key, "ready").set(int(plan.status.get("readyReplicas") or 0))
    for direction in AUTOSCALER_DIRECTIONS:  # 0 until a decision: a series, not "no data"
        metrics.AUTOSCALER_DECISIONS.labels(*key, direction)
    if plan.scale_to is not None:
        await _scale(op, key, obj, spec.replicas, plan)
    if plan.requeue_after is not None:
        op.services.add_after(key, plan.requeue_after)


async def _scale(op: Operator, key: Key, obj: Obj, current: int, plan: ServicePlan) -> None:
    """Move spec.replicas as HPA would; the watch event of that write drives the next pass."""
    assert plan.scale_to is not None
    updated = await asyncio.to_thread(kube.scale, INFERENCE_PLURAL, key[0], key[1], plan.scale_to)
    if updated is None:
        return
    direction = "up" if plan.scale_to > current else "down"
    metrics.AUTOSCALER_DECISIONS.labels(*key, direction).inc()
    message = next(
        (
            c.get("message", "")
            for c in plan.status.get("conditions") or []
            if c["type"] == "ScalingActive"
        ),
        "",
    )
    reason = Reason.SCALED_UP if direction == "up" else Reason.SCALED_DOWN
    await asyncio.to_thread(
        kube.event, obj, "Normal", reason, f"{current} -> {plan.scale_to} replicas: {message}"
    )
    log.info("scaled %s/%s from %d to %d replicas", *key, current, plan.scale_to)


def services_using_job(op: Operator, namespace: str, job: str) -> list[Key]:
    """Services in `namespace` that serve `job`'s export (re-checked when the job changes)."""
    found = []
    for key, obj in list(op.cache.services.items.items()):
        source = ((obj.get("spec") or {}).get("model") or {}).get("fromTrainJob") or {}
        if key[0] == namespace and source.get("name") == job:
            found.append(key)
    return found


def services_in(op: Operator, namespace: str) -> list[Key]:
    return [key for key in list(op.cache.services.items) if key[0] == namespace]
