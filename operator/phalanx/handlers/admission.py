"""The gang admission loop: one place where capacity is promised, so nothing is promised twice.

Woken by any change that can matter (a gang queued, a pod gone, a node changed), it builds a
capacity snapshot from the cache, asks `placement.admit` for decisions, and for each placed gang
first records the placement, then ungates every pod with a hostname selector. After a crash, a
gang whose placement is recorded but whose pods are still partly gated is finished first, with
its recorded nodes reserved, so a restart never double-books.

Gangs are LLMTrainJobs (placement recorded in the job's status) and multi-pod InferenceService
groups (placement recorded as an annotation on the group's leader pod), in one queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from phalanx import kube, metrics, observe
from phalanx.api.inference import InferenceService
from phalanx.api.trainjob import LLMTrainJob, LLMTrainJobSpec
from phalanx.api.validate import SpecError
from phalanx.constants import (
    GANG_GATE,
    LABEL_HOSTNAME,
    LABEL_RANK,
    LABEL_WORKER_INDEX,
    TRAINJOB_PLURAL,
)
from phalanx.placement import (
    CapacitySnapshot,
    GangRequest,
    Placement,
    Topology,
    Unplaceable,
    admission_window,
    admit,
    hold_for_preferred,
    pod_requests,
)
from phalanx.plan.groups import groups_of
from phalanx.render.inference import ANNOTATION_PLACEMENT
from phalanx.status import is_true, timestamp

from .state import Key, Obj, Operator

log = logging.getLogger("phalanx.admission")
# Changes arriving in a burst (a 64-pod gang being created) are handled in one pass.
DEBOUNCE_SECONDS = 0.05
VERDICT_REFRESH_SECONDS = 30.0


@dataclass(frozen=True)
class Gang:
    """A train job's gang (`group` None) or one multi-pod group of an InferenceService."""

    key: Key
    job: Obj
    spec: Any
    generation: int
    pods: list[Obj]
    group: int | None = None

    @property
    def request_key(self) -> str:
        # "/" cannot occur in names, so group keys never collide with job keys.
        base = f"{self.key[0]}/{self.key[1]}"
        return base if self.group is None else f"{base}/group-{self.group}"

    @property
    def size(self) -> int:
        return int(self.spec.nodes if self.group is None else self.spec.nodes_per_replica)

    def index_of(self, pod: Obj) -> int:
        label = LABEL_RANK if self.group is None else LABEL_WORKER_INDEX
        return int(pod["metadata"]["labels"].get(label, "0"))

    def leader(self) -> Obj:
        return min(self.pods, key=self.index_of)

    def recorded(self) -> list[str] | None:
        """Nodes of a placement recorded before the pods were ungated, if any."""
        if self.group is None:
            placement = (self.job.get("status") or {}).get("placement") or {}
            nodes = placement.get("nodes") or []
            fits = placement.get("generation") == self.generation and len(nodes) == self.size
            return list(nodes) if fits else None
        text = (self.leader()["metadata"].get("annotations") or {}).get(ANNOTATION_PLACEMENT)
        try:
            nodes = json.loads(text)["nodes"] if text else None
        except (ValueError, KeyError, TypeError):
            return None
        return list(nodes) if isinstance(nodes, list) and len(nodes) == self.size else None


def _created(job: Obj) -> float:
    """When the gang joined the queue (its job's queuedAt, else the object's creation)."""
    stamp = (job.get("status") or {}).get("queuedAt") or job["metadata"].get("creationTimestamp")
    when = observe.parse_time(stamp)
    return when.timestamp() if when is not None else 0.0


def _spec_of(op: Operator, job: Obj) -> LLMTrainJobSpec | None:
    parsed = op.parsed(job, LLMTrainJob)
    return None if isinstance(parsed, SpecError) else parsed.spec


def queued_gangs(op: Operator) -> tuple[list[Gang], list[Gang]]:
    """(gangs waiting for a placement, gangs placed but not yet fully ungated)."""
    waiting: list[Gang] = []
    unfinished: list[Gang] = []
    for gang in [*_trainjob_gangs(op), *_service_gangs(op)]:
        gated = [p for p in gang.pods if observe.gated(p)]
        if not gated:
            continue
        if gang.recorded() is not None:
            unfinished.append(gang)
        elif len(gated) == len(gang.pods):
            waiting.append(gang)
    return waiting, unfinished


def _trainjob_gangs(op: Operator) -> list[Gang]:
    gangs: list[Gang] = []
    for key, job in list(op.cache.trainjobs.items.items()):
        status = job.get("status") or {}
        conditions = status.get("conditions") or []
        if any(is_true(conditions, c) for c in ("Succeeded", "Failed", "Suspended")):
            continue
        spec = _spec_of(op, job)
        if spec is None:
            continue
        if spec.run_policy.gang_scheduler != "builtin" or spec.run_policy.suspend:
            continue
        generation = int(status.get("gangGeneration") or 1)
        pods = [p for p in op.cache.pods_of_job(key) if observe.generation(p) == generation]
        if len(pods) != spec.nodes or any(observe.terminating(p) for p in pods):
            continue
        gangs.append(Gang(key, job, spec, generation, pods))
    return gangs


def _service_gangs(op: Operator) -> list[Gang]:
    """Complete groups of services with more than one pod per replica."""
    gangs: list[Gang] = []
    for key, obj in list(op.cache.services.items.items()):
        if observe.terminating(obj):
            continue
        parsed = op.parsed(obj, InferenceService)
        if isinstance(parsed, SpecError):
            continue
        spec = parsed.spec
        if spec.nodes_per_replica < 2:
            continue
        for index, group in groups_of(op.cache.pods_of_service(key)).items():
            pods = list(group.pods)
            if len(pods) != spec.nodes_per_replica or any(observe.terminating(p) for p in pods):
                continue
            gangs.append(Gang(key, obj, spec, 0, [dict(p) for p in pods], group=index))
    return gangs


def request_for(gang: Gang) -> GangRequest:
    first = min(gang.pods, key=lambda p: p["metadata"]["name"])
    if gang.group is None:
        priority, created = gang.spec.run_policy.priority, _created(gang.job)
    else:
        priority, created = 0, _created(gang.leader())
    return GangRequest(
        key=gang.request_key,
        pods=gang.size,
        per_pod=pod_requests(first),
        required=gang.spec.topology.required,
        preferred=gang.spec.topology.preferred,
        priority=priority,
        created=created,
        preferred_wait=float(gang.spec.topology.preferred_wait_seconds),
    )


async def _release(op: Operator, gang: Gang, nodes: list[str]) -> None:
    """Pin each gated pod to its node and lift the gate, all pods concurrently."""

    async def pin(pod: Obj) -> None:
        if not observe.gated(pod):
            return
        gates = [g for g in pod["spec"].get("schedulingGates") or [] if g.get("name") != GANG_GATE]
        selector = {
            **(pod["spec"].get("nodeSelector") or {}),
            LABEL_HOSTNAME: nodes[gang.index_of(pod)],
        }
        patch = {"spec": {"nodeSelector": selector, "schedulingGates": gates or None}}
        updated = await asyncio.to_thread(
            kube.patch_pod, gang.key[0], pod["metadata"]["name"], patch
        )
        if updated is not None:
            op.cache.put_pod(updated)

    await asyncio.gather(*(pin(p) for p in gang.pods))


async def admission_pass(op: Operator, topology: Topology, window: int = 32) -> None:
    nodes = list(op.cache.nodes.values())
    pods = list(op.cache.pods.values())
    waiting, unfinished = queued_gangs(op)
    # Snapshots and placement are CPU work: run them off the event loop so watches keep flowing.
    snapshot = await asyncio.to_thread(CapacitySnapshot.from_objects, nodes, pods)
    # Finish interrupted releases first: their recorded nodes are already promised.
    for gang in unfinished:
        recorded = gang.recorded() or []
        still_gated = [
            recorded[gang.index_of(p)]
            for p in gang.pods
            if observe.gated(p) and recorded[gang.index_of(p)] in snapshot
        ]
        snapshot = snapshot.with_reserved(still_gated, request_for(gang).per_pod)
        await _release(op, gang, recorded)
    _clear_service_verdicts(op, waiting)
    if not waiting:
        return
    total = await asyncio.to_thread(CapacitySnapshot.from_objects, nodes)
    by_key = {g.request_key: g for g in waiting}
    head, behind = admission_window((request_for(g) for g in waiting), window)
    for request, verdict in behind:
        assert isinstance(verdict, Unplaceable)
        _remember_verdict(op, by_key[request.key], verdict)
    decisions = await asyncio.to_thread(admit, snapshot, head, topology, total)
    decisions, recheck = await asyncio.to_thread(
        hold_for_preferred, decisions, topology, total, op.clock().timestamp()
    )
    if recheck is not None:
        asyncio.get_running_loop().call_later(recheck + 0.5, op.wake_admission)
    placed = []
    for request, result in decisions:
        gang = by_key[request.key]
        if isinstance(result, Placement):
            if gang.group is None:
                op.verdicts.pop(gang.key, None)
                placed.append(_record_and_release(op, gang, result))
            else:
                op.service_verdicts.pop(gang.key, None)
                placed.append(_record_and_release_group(op, gang, result))
        else:
            _remember_verdict(op, gang, result)
    await asyncio.gather(*placed)


def _remember_verdict(op: Operator, gang: Gang, verdict: Unplaceable) -> None:
    text = (
        verdict.reason,
        verdict.message
        + (" This gang can never fit; change the spec." if verdict.permanent else ""),
    )
    verdicts, queue = (
        (op.verdicts, op.trainjobs) if gang.group is None else (op.service_verdicts, op.services)
    )
    previous = verdicts.get(gang.key)
    verdicts[gang.key] = text
    # A new reason is news at once; a reworded message (free slots change on every pass) is
    # written at most every VERDICT_REFRESH_SECONDS, or status writes would swamp the API.
    now = op.clock().timestamp()
    news = previous is None or previous[0] != text[0]
    stale = (
        previous != text and now - op.verdict_written.get(gang.key, 0.0) >= VERDICT_REFRESH_SECONDS
    )
    if news or stale:
        op.verdict_written[gang.key] = now
        queue.add(gang.key)


def _clear_service_verdicts(op: Operator, waiting: list[Gang]) -> None:
    """A service with no group waiting any more has nothing left to explain."""
    still = {g.key for g in waiting if g.group is not None}
    for key in [k for k in op.service_verdicts if k not in still]:
        op.service_verdicts.pop(key, None)
        op.services.add(key)


async def _record_and_release_group(op: Operator, gang: Gang, placement: Placement) -> None:
    """Record the placement on the leader pod first: that survives an operator crash."""
    record = {"level": placement.level, "domain": placement.domain, "nodes": list(placement.nodes)}
    leader = gang.leader()
    patch = {"metadata": {"annotations": {ANNOTATION_PLACEMENT: json.dumps(record)}}}
    updated = await asyncio.to_thread(
        kube.patch_pod, gang.key[0], leader["metadata"]["name"], patch
    )
    if updated is None:
        return
    op.cache.put_pod(updated)
    await _release(op, gang, list(placement.nodes))
    metrics.PLACEMENTS.labels(level=placement.level).inc()
    metrics.ADMISSION_WAIT.observe(max(0.0, op.clock().timestamp() - _created(leader)))
    op.services.add(gang.key)
    log.info(
        "placed %s/%s group %s in %s %s", *gang.key, gang.group, placement.level, placement.domain
    )


async def _record_and_release(op: Operator, gang: Gang, placement: Placement) -> None:
    now = op.clock()
    record = {
        "placement": {
            "level": placement.level,
            "domain": placement.domain,
            "nodes": list(placement.nodes),
            "generation": gang.generation,
        },
        "admittedAt": timestamp(now),
    }
    updated = await asyncio.to_thread(
        kube.patch_status, TRAINJOB_PLURAL, gang.key[0], gang.key[1], record
    )
    if updated is None:
        return
    op.cache.trainjobs.put(updated)
    await _release(op, gang, list(placement.nodes))
    metrics.PLACEMENTS.labels(level=placement.level).inc()
    metrics.ADMISSION_WAIT.observe(max(0.0, now.timestamp() - _created(gang.job)))
    op.trainjobs.add(gang.key)
    log.info("placed %s/%s in %s %s", *gang.key, placement.level, placement.domain)


async def admission_loop(op: Operator, topology: Topology, window: int = 32) -> None:
    await op.cache.synced.wait()
    while True:
        await op.admission_wanted.wait()
        await asyncio.sleep(DEBOUNCE_SECONDS)
        op.admission_wanted.clear()
        started = time.perf_counter()
        try:
            await admission_pass(op, topology, window)
            log.debug("admission pass took %.3fs", time.perf_counter() - started)
        except Exception:  # never let one bad pass stop admission for everyone
            log.exception("admission pass failed; retrying")
            await asyncio.sleep(1)
            op.wake_admission()
