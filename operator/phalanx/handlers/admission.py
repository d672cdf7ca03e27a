"""The gang admission loop: one place where capacity is promised, so nothing is promised twice.

Woken by any change that can matter (a gang queued, a pod gone, a node changed), it builds a
capacity snapshot from the cache, asks `placement.admit` for decisions, and for each placed gang
first records the placement in the job's status, then ungates every pod with a hostname
selector. After a crash, a gang whose placement is recorded but whose pods are still partly
gated is finished first, with its recorded nodes reserved, so a restart never double-books.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from phalanx import kube, metrics
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError, parse
from phalanx.constants import GANG_GATE, LABEL_GENERATION, LABEL_HOSTNAME, TRAINJOB_PLURAL
from phalanx.placement import (
    CapacitySnapshot,
    GangRequest,
    Placement,
    Topology,
    Unplaceable,
    admit,
    pod_requests,
    queue_order,
)
from phalanx.status import is_true, timestamp

from .state import Key, Obj, Operator

log = logging.getLogger("phalanx.admission")
# Changes arriving in a burst (a 64-pod gang being created) are handled in one pass.
DEBOUNCE_SECONDS = 0.05


@dataclass(frozen=True)
class Gang:
    key: Key
    job: Obj
    spec: Any
    generation: int
    pods: list[Obj]


def _gated(pod: Obj) -> bool:
    return any(g.get("name") == GANG_GATE for g in pod.get("spec", {}).get("schedulingGates") or [])


def _generation_of(pod: Obj) -> int:
    try:
        return int(pod["metadata"]["labels"][LABEL_GENERATION])
    except (KeyError, ValueError):
        return 0


def _created(job: Obj) -> float:
    stamp = (job.get("status") or {}).get("queuedAt") or job["metadata"].get("creationTimestamp")
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def queued_gangs(op: Operator) -> tuple[list[Gang], list[Gang]]:
    """(gangs waiting for a placement, gangs placed but not yet fully ungated)."""
    waiting: list[Gang] = []
    unfinished: list[Gang] = []
    for key, job in list(op.cache.trainjobs.items.items()):
        status = job.get("status") or {}
        conditions = status.get("conditions") or []
        if any(is_true(conditions, c) for c in ("Succeeded", "Failed", "Suspended")):
            continue
        try:
            spec = parse(job, LLMTrainJob).spec
        except SpecError:
            continue
        if spec.run_policy.gang_scheduler != "builtin" or spec.run_policy.suspend:
            continue
        generation = int(status.get("gangGeneration") or 1)
        pods = [p for p in op.cache.pods_of_job(key) if _generation_of(p) == generation]
        if len(pods) != spec.nodes or any(p["metadata"].get("deletionTimestamp") for p in pods):
            continue
        gated = [p for p in pods if _gated(p)]
        if not gated:
            continue
        placement = status.get("placement") or {}
        gang = Gang(key, job, spec, generation, pods)
        if (
            placement.get("generation") == generation
            and len(placement.get("nodes") or []) == spec.nodes
        ):
            unfinished.append(gang)
        elif len(gated) == len(pods):
            waiting.append(gang)
    return waiting, unfinished


def request_for(gang: Gang) -> GangRequest:
    first = min(gang.pods, key=lambda p: p["metadata"]["name"])
    return GangRequest(
        key=f"{gang.key[0]}/{gang.key[1]}",
        pods=gang.spec.nodes,
        per_pod=pod_requests(first),
        required=gang.spec.topology.required,
        preferred=gang.spec.topology.preferred,
        priority=gang.spec.run_policy.priority,
        created=_created(gang.job),
    )


def _rank(pod: Obj) -> int:
    return int(pod["metadata"]["labels"].get("phalanx.dev/rank", "0"))


async def _release(op: Operator, gang: Gang, nodes: list[str]) -> None:
    """Pin each gated pod to its node and lift the gate, all pods concurrently."""

    async def pin(pod: Obj) -> None:
        if not _gated(pod):
            return
        gates = [g for g in pod["spec"].get("schedulingGates") or [] if g.get("name") != GANG_GATE]
        selector = {**(pod["spec"].get("nodeSelector") or {}), LABEL_HOSTNAME: nodes[_rank(pod)]}
        patch = {"spec": {"nodeSelector": selector, "schedulingGates": gates or None}}
        updated = await asyncio.to_thread(
            kube.patch_pod, gang.key[0], pod["metadata"]["name"], patch
        )
        if updated is not None:
            op.cache.put_pod(updated)

    await asyncio.gather(*(pin(p) for p in gang.pods))


async def admission_pass(op: Operator, topology: Topology, window: int = 32) -> None:
    nodes = list(op.cache.nodes.values())
    waiting, unfinished = queued_gangs(op)
    snapshot = CapacitySnapshot.from_objects(nodes, op.cache.pods.values())
    # Finish interrupted releases first: their recorded nodes are already promised.
    for gang in unfinished:
        placement = (gang.job.get("status") or {}).get("placement") or {}
        recorded = list(placement["nodes"])
        still_gated = [
            recorded[_rank(p)] for p in gang.pods if _gated(p) and recorded[_rank(p)] in snapshot
        ]
        snapshot = snapshot.with_reserved(still_gated, request_for(gang).per_pod)
        await _release(op, gang, recorded)
    if not waiting:
        return
    total = CapacitySnapshot.from_objects(nodes)
    by_key = {f"{g.key[0]}/{g.key[1]}": g for g in waiting}
    ordered = queue_order(request_for(g) for g in waiting)
    # Each placement attempt scans every node; the head of the queue is where admissions
    # happen, so a pass looks at a bounded window and the rest wait their turn.
    head, tail = ordered[:window], ordered[window:]
    for position, request in enumerate(tail, start=window + 1):
        _remember_verdict(
            op,
            by_key[request.key].key,
            Unplaceable("Queued", f"Position {position} in the admission queue.", permanent=False),
        )
    decisions = admit(snapshot, head, topology, total)
    for request, result in decisions:
        gang = by_key[request.key]
        if isinstance(result, Placement):
            op.verdicts.pop(gang.key, None)
            await _record_and_release(op, gang, result)
        else:
            _remember_verdict(op, gang.key, result)


def _remember_verdict(op: Operator, key: Key, verdict: Unplaceable) -> None:
    text = (
        verdict.reason,
        verdict.message
        + (" This gang can never fit; change the spec." if verdict.permanent else ""),
    )
    if op.verdicts.get(key) != text:
        op.verdicts[key] = text
        op.trainjobs.add(key)


async def _record_and_release(op: Operator, gang: Gang, placement: Placement) -> None:
    now = datetime.now(UTC)
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
        try:
            await admission_pass(op, topology, window)
        except Exception:  # never let one bad pass stop admission for everyone
            log.exception("admission pass failed; retrying")
            await asyncio.sleep(1)
            op.wake_admission()
