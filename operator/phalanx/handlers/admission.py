"""The gang admission loop: one place where capacity is promised, so nothing is promised twice.

Woken by any change that can matter (a gang queued, a pod gone, a node changed), it builds a
capacity snapshot from the cache, asks `placement.admit` for decisions, and for each placed gang
first records the placement, then ungates every gated pod with a node pin. A train job that can
be created bound (`plan.trainjob.binds_at_creation`) is looked at before its pods exist: placed,
its reconcile creates them bound to the recorded nodes (one API write per pod); not placed, it
is marked declined and its pods are created gated, to wait in the queue. A gang whose placement
is recorded but whose pods are still partly gated or not all created is finished first, with
its recorded nodes reserved, so neither a crash nor the creation in flight double-books.

Gangs are LLMTrainJobs (placement recorded in the job's status) and multi-pod InferenceService
groups (placement recorded as an annotation on the group's leader pod), in one queue.

Under a spare policy (PHALANX_SPARES, `placement.spares`) each pass also works out the spare
nodes: ordinary gangs keep off them, preemptible ones may fill them, and a gang recovering from
failures is placed again in the domain it ran in. Fillers on the nodes a recovery takes are
preempted first: a preemptible LLMTrainJob gets `status.preemption` (its planner re-queues it)
and its pods are deleted with their grace period, other pods are deleted likewise; each is
counted and an event names both workloads.
"""

from __future__ import annotations

import asyncio
import functools
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
    LABEL_JOB,
    LABEL_PREEMPTIBLE,
    LABEL_RANK,
    LABEL_WORKER_INDEX,
    TRAINJOB_PLURAL,
    Reason,
)
from phalanx.placement import (
    CapacitySnapshot,
    GangRequest,
    Placement,
    PodConstraints,
    SparePolicy,
    Spares,
    Topology,
    Unplaceable,
    admission_window,
    admit,
    holding_node,
    is_preemptible_pod,
    pod_requests,
    recheck_after,
    recovery_domain,
    spare_nodes,
    untouched,
)
from phalanx.plan.groups import groups_of
from phalanx.plan.trainjob import binds_at_creation, gang_pod, recorded_nodes
from phalanx.render.inference import ANNOTATION_PLACEMENT
from phalanx.render.pod import pin_patch
from phalanx.render.trainjob import JobRef
from phalanx.status import is_true, timestamp

from . import queue_wait
from .apply import delete_pods
from .state import Key, Obj, Operator

log = logging.getLogger("phalanx.admission")
# Changes arriving in a burst (a 64-pod gang being created) are handled in one pass.
DEBOUNCE_SECONDS = 0.05
VERDICT_REFRESH_SECONDS = 30.0
# Reworded verdicts written per second across the whole queue, at most: a deep queue refreshes
# each gang's message less often instead of writing (and re-reconciling) more.
VERDICT_REWORDS_PER_SECOND = 2.0


@dataclass(frozen=True)
class Gang:
    """A train job's gang (`group` None) or one multi-pod group of an InferenceService."""

    key: Key
    job: Obj
    spec: Any
    generation: int
    pods: list[Obj]
    group: int | None = None
    # Rank 0's pod as it would be created: the shape of a gang whose pods do not all exist.
    template: Obj | None = None

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

    def sample(self) -> Obj:
        """One pod of the gang (they share one shape), or the template while none exists."""
        if self.pods:
            return min(self.pods, key=lambda p: p["metadata"]["name"])
        assert self.template is not None
        return self.template

    def missing(self) -> list[int]:
        """Indexes of the gang with no pod yet."""
        present = {self.index_of(p) for p in self.pods}
        return [i for i in range(self.size) if i not in present]

    def recorded(self) -> list[str] | None:
        """Nodes of a placement recorded before the pods were ungated or created, if any."""
        if self.group is None:
            return recorded_nodes(self.job.get("status") or {}, self.generation, self.size)
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
        if gang.recorded() is not None:
            if gated or gang.missing():
                unfinished.append(gang)
        elif not gang.pods or len(gated) == len(gang.pods) == gang.size:
            waiting.append(gang)  # no pod yet (one to be created bound), or every pod gated
    return waiting, unfinished


def _trainjob_gangs(op: Operator) -> list[Gang]:
    gangs: list[Gang] = []
    for key, job in list(op.cache.trainjobs.items.items()):
        if op.cache.going(job):
            continue
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
        if any(observe.terminating(p) for p in pods):
            continue
        if len(pods) == spec.nodes:
            gangs.append(Gang(key, job, spec, generation, pods))
        elif recorded_nodes(status, generation, spec.nodes) is not None or (
            not pods and _binds_at_creation(op, key, spec, generation)
        ):
            # Placed with pods still to create, or a gang placed before its pods exist.
            meta = job["metadata"]
            ref = JobRef(meta["name"], key[0], meta["uid"], op.cache.pod_security(key[0]))
            template = gang_pod(ref, spec, status, 0, generation)
            gangs.append(Gang(key, job, spec, generation, pods, template=template))
    return gangs


def _binds_at_creation(op: Operator, key: Key, spec: LLMTrainJobSpec, generation: int) -> bool:
    """A job whose pods are created bound once placed, not yet looked at for this gang."""
    return (
        binds_at_creation(spec, op.cache.checkpoint_bound(key, spec))
        and op.declined.get(key) != generation
    )


def _service_gangs(op: Operator) -> list[Gang]:
    """Complete groups of services with more than one pod per replica."""
    gangs: list[Gang] = []
    for key, obj in list(op.cache.services.items.items()):
        if op.cache.going(obj):
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


def request_for(
    gang: Gang, spares: SparePolicy | None = None, op: Operator | None = None
) -> GangRequest:
    first = gang.sample()
    preemptible, recover, own = False, None, 0
    if gang.group is None:
        priority, created = gang.spec.run_policy.priority, _created(gang.job)
        preemptible = bool(gang.spec.run_policy.preemptible)
        own = int(gang.spec.failure_policy.spares)
        if (spares is not None or own) and op is not None and op.topology is not None:
            recover = _recover_from(op, gang.job, spares, op.topology)
    else:
        priority, created = 0, _created(gang.leader())
    # Waiting on capacity no running job is known to release (an estimate was made and found
    # no start): holding a domain for it would idle those nodes for an unknown time.
    wait = op.waits.get(gang.request_key) if op is not None else None
    return GangRequest(
        holds=wait is None or wait.start is not None,
        preemptible=preemptible,
        recover=recover,
        spares=own,
        key=gang.request_key,
        pods=gang.size,
        per_pod=pod_requests(first),
        required=gang.spec.topology.required,
        preferred=gang.spec.topology.preferred,
        priority=priority,
        created=created,
        preferred_wait=float(gang.spec.topology.preferred_wait_seconds),
        # Placement must not pick a node kube-scheduler would then refuse the pods (a waiting
        # gang's pods are all gated, so none carries placement's own pin yet).
        constraints=PodConstraints.from_pod(first),
    )


async def _release(op: Operator, gang: Gang, nodes: list[str]) -> None:
    """Pin each gated pod to its node and lift the gate, all pods concurrently."""

    async def pin(pod: Obj) -> None:
        if not observe.gated(pod):
            return
        patch = pin_patch(pod, nodes[gang.index_of(pod)])
        updated = await asyncio.to_thread(
            kube.patch_pod, gang.key[0], pod["metadata"]["name"], patch
        )
        if updated is not None:
            op.cache.put_pod(updated)

    await asyncio.gather(*(pin(p) for p in gang.pods))


def _recovering(job: Obj) -> dict[str, Any] | None:
    """Where a job restarting after failures ran (status.recoverFrom), until it is placed."""
    status = job.get("status") or {}
    previous = status.get("recoverFrom") or {}
    if status.get("placement") or not previous.get("domain") or not previous.get("level"):
        return None
    return dict(previous)


def _recover_from(
    op: Operator, job: Obj, policy: SparePolicy | None, topology: Topology
) -> tuple[str, str] | None:
    """The domain a recovering job's replacement is placed in first (`recovery_domain`)."""
    previous = _recovering(job)
    if previous is None:
        return None
    nodes = [str(n) for n in previous.get("nodes") or []]
    labels = {
        n: dict(((op.cache.nodes.get(("", n)) or {}).get("metadata") or {}).get("labels") or {})
        for n in dict.fromkeys(nodes)
    }
    return recovery_domain(
        str(previous["level"]), str(previous["domain"]), nodes, labels, policy, topology
    )


def _daemon(pod: Obj) -> bool:
    """A per-node daemon: on every node alike, so it never makes a node busy with work."""
    owners = pod["metadata"].get("ownerReferences") or []
    return any(o.get("kind") == "DaemonSet" for o in owners)


def _filler(pod: Obj) -> bool:
    return not _daemon(pod) and is_preemptible_pod(pod, LABEL_PREEMPTIBLE)


def kept_for_jobs(op: Operator, policy: SparePolicy | None) -> frozenset[str]:
    """Nodes ordinary gangs keep off for running jobs: the room of their own spares
    (failurePolicy.spares), and, under a spare policy or the job's own spares, a recovering
    gang's nodes (it gets them back: nobody else is placed on them between its old gang's
    deletion and the new one's placement). Without either the replacement is an ordinary
    gang (`request_for` gives it no recovery domain), so its old nodes must stay open to it."""
    kept: set[str] = set()
    for job in op.cache.trainjobs.values():
        if _ended(job):
            continue
        status = job.get("status") or {}
        kept.update((status.get("placement") or {}).get("spareNodes") or [])
        own = ((job.get("spec") or {}).get("failurePolicy") or {}).get("spares") or 0
        if (policy is not None or own) and _recovering(job) is not None:
            previous = status.get("recoverFrom") or {}
            kept.update(previous.get("nodes") or [])
            kept.update(previous.get("spareNodes") or [])
    return frozenset(kept)


def spares_of(
    nodes: list[Obj],
    pods: list[Obj],
    policy: SparePolicy | None,
    kept: frozenset[str],
    topology: Topology,
) -> tuple[Spares, frozenset[str], frozenset[str]]:
    """This pass's spares: (what admission needs, the policy's spare nodes, the nodes with a
    filler)."""
    reclaimable = CapacitySnapshot.from_objects(nodes, [p for p in pods if not _filler(p)])
    filled = frozenset(n for p in pods if _filler(p) and (n := holding_node(p)) is not None)
    spare: frozenset[str] = frozenset()
    if policy is not None:
        baseline = CapacitySnapshot.from_objects(nodes, [p for p in pods if _daemon(p)])
        candidates = untouched(baseline, reclaimable)
        spare = spare_nodes(reclaimable, candidates, filled, policy, topology)
    return Spares(policy, spare | kept, reclaimable), spare, filled


def _ended(job: Obj) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(is_true(conditions, c) for c in ("Succeeded", "Failed", "Suspended"))


async def admission_pass(
    op: Operator, topology: Topology, window: int = 0, spare_policy: SparePolicy | None = None
) -> None:
    nodes = list(op.cache.nodes.values())
    pods = list(op.cache.pods.values())
    waiting, unfinished = queued_gangs(op)
    # Snapshots and placement are CPU work: run them off the event loop so watches keep flowing.
    snapshot = await asyncio.to_thread(CapacitySnapshot.from_objects, nodes, pods)
    spares: Spares | None = None
    kept = kept_for_jobs(op, spare_policy)
    own = any(g.group is None and g.spec.failure_policy.spares for g in waiting)
    if spare_policy is not None or kept or own:
        spares, spare, filled = await asyncio.to_thread(
            spares_of, nodes, pods, spare_policy, kept, topology
        )
        metrics.SPARE_NODES.labels(state="filled").set(len(spare & filled))
        metrics.SPARE_NODES.labels(state="idle").set(len(spare - filled))
    # Finish interrupted releases first: their recorded nodes are already promised, to the
    # gated pods and to the ranks whose pods are still to be created bound.
    for gang in unfinished:
        recorded = gang.recorded() or []
        waiting_for = [gang.index_of(p) for p in gang.pods if observe.gated(p)] + gang.missing()
        still_gated = [recorded[i] for i in waiting_for if recorded[i] in snapshot]
        per_pod = request_for(gang).per_pod
        snapshot = snapshot.with_reserved(still_gated, per_pod)
        if spares is not None:
            reclaim = spares.reclaimable
            held = [n for n in still_gated if n in reclaim]
            spares = Spares(spares.policy, spares.reserved, reclaim.with_reserved(held, per_pod))
        # The ranks still to be created are the reconcile's to create (the placement's status
        # write woke it); asking it again from every pass would ping-pong with its wake-up
        # whenever a create changes nothing (a terminating namespace, a pod the cache lags on).
        await _release(op, gang, recorded)
    _clear_service_verdicts(op, waiting)
    if not waiting:
        return
    # "Never fits" is judged against every node, including ones only briefly unschedulable
    # (not ready yet, cordoned), never against the momentary free set.
    total = await asyncio.to_thread(
        functools.partial(CapacitySnapshot.from_objects, nodes, capacity=True)
    )
    by_key = {g.request_key: g for g in waiting}
    head, behind = admission_window((request_for(g, spare_policy, op) for g in waiting), window)
    refresh = verdict_refresh_seconds(len(waiting))
    for request, verdict in behind:
        assert isinstance(verdict, Unplaceable)
        _remember_verdict(op, by_key[request.key], verdict, refresh)
    now = op.clock().timestamp()
    decisions = await asyncio.to_thread(admit, snapshot, head, topology, total, now, spares)
    unplaced = [request for request, result in decisions if not isinstance(result, Placement)]
    await queue_wait.refresh(op, nodes, pods, unplaced, topology, total)
    recheck = recheck_after(decisions, now)
    if recheck is not None:
        asyncio.get_running_loop().call_later(recheck + 0.5, op.wake_admission)
    # Fillers leave the spares a recovery takes before its pods are released onto them.
    for request, result in decisions:
        if isinstance(result, Placement) and result.displaced:
            await _preempt(op, by_key[request.key], result, pods)
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
            _remember_verdict(op, gang, result, refresh)
    await asyncio.gather(*placed)


def verdict_refresh_seconds(queued: int) -> float:
    """How often one gang's reworded verdict may be written with `queued` gangs waiting."""
    return max(VERDICT_REFRESH_SECONDS, queued / VERDICT_REWORDS_PER_SECOND)


def _remember_verdict(
    op: Operator, gang: Gang, verdict: Unplaceable, refresh: float = VERDICT_REFRESH_SECONDS
) -> None:
    text = (
        verdict.reason,
        verdict.message
        + (" This gang can never fit; change the spec." if verdict.permanent else "")
        + (f" {wait.describe(op.clock())}" if (wait := op.waits.get(gang.request_key)) else ""),
    )
    verdicts, queue = (
        (op.verdicts, op.trainjobs) if gang.group is None else (op.service_verdicts, op.services)
    )
    previous = verdicts.get(gang.key)
    verdicts[gang.key] = text
    if gang.group is None and not gang.pods and op.declined.get(gang.key) != gang.generation:
        # Not placed before its pods exist: they are created gated and wait in the queue.
        op.declined[gang.key] = gang.generation
        queue.add(gang.key)
    # A new reason is news at once; a reworded message (free slots change on every pass) is
    # written at most every `refresh` seconds, or status writes (and the reconciles each one
    # sets off) would swamp the API and the operator.
    now = op.clock().timestamp()
    news = previous is None or previous[0] != text[0]
    stale = previous != text and now - op.verdict_written.get(gang.key, 0.0) >= refresh
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


async def _preempt(op: Operator, gang: Gang, placement: Placement, pods: list[Obj]) -> None:
    """Preempt the fillers on the nodes a recovery takes, gracefully: a preemptible
    LLMTrainJob is marked preempted (its planner queues it again) and its whole gang is deleted
    with its grace period; any other preemptible pod is deleted likewise."""
    displaced = set(placement.displaced)
    by = f"{gang.key[0]}/{gang.key[1]}"
    jobs: dict[Key, set[str]] = {}
    plain: list[Obj] = []
    for pod in pods:
        node = holding_node(pod)
        if node not in displaced or not _filler(pod) or observe.terminating(pod):
            continue
        job = (pod["metadata"].get("labels") or {}).get(LABEL_JOB)
        if job:
            jobs.setdefault((pod["metadata"]["namespace"], job), set()).add(str(node))
        else:
            plain.append(pod)
    now = timestamp(op.clock())
    # Every filler at once: the recovery waits for the slowest, not for the sum.
    await asyncio.gather(
        *(_preempt_job(op, key, sorted(on), by, now) for key, on in jobs.items()),
        *(_preempt_pod(op, pod, by) for pod in plain),
    )


async def _preempt_job(op: Operator, key: Key, on: list[str], by: str, now: str) -> None:
    """Mark a filler LLMTrainJob preempted (its planner re-queues it), then delete its gang."""
    job = op.cache.trainjobs.get(key)
    if job is None:
        return
    generation = int((job.get("status") or {}).get("gangGeneration") or 1)
    record = {"preemption": {"by": by, "nodes": on, "generation": generation, "at": now}}
    updated = await asyncio.to_thread(kube.patch_status, TRAINJOB_PLURAL, key[0], key[1], record)
    if updated is None:
        return
    op.cache.trainjobs.put(updated)
    victims = [
        p
        for p in op.cache.pods_of_job(key)
        if observe.generation(p) == generation and not observe.terminating(p)
    ]
    await delete_pods(op, key[0], [observe.name(p) for p in victims], seen=victims)
    metrics.SPARE_PREEMPTIONS.labels(kind="LLMTrainJob").inc()
    message = (
        f"Preempted from spare node{'s' if len(on) > 1 else ''} {', '.join(on)} "
        f"for the recovery of {by}; queued again."
    )
    await asyncio.to_thread(kube.event, updated, "Warning", Reason.PREEMPTED, message)
    op.trainjobs.add(key)
    log.info("preempted filler %s/%s from %s for %s", *key, on, by)


async def _preempt_pod(op: Operator, pod: Obj, by: str) -> None:
    """Delete a preemptible pod of another controller, with its grace period."""
    await delete_pods(op, pod["metadata"]["namespace"], [observe.name(pod)], seen=[pod])
    metrics.SPARE_PREEMPTIONS.labels(kind="Pod").inc()
    message = f"Preempted from spare node {holding_node(pod)} for the recovery of LLMTrainJob {by}."
    await asyncio.to_thread(kube.event, pod, "Warning", Reason.PREEMPTED, message)


async def _record_and_release(op: Operator, gang: Gang, placement: Placement) -> None:
    now = op.clock()
    record: dict[str, Any] = {
        "placement": {
            "level": placement.level,
            "domain": placement.domain,
            "nodes": list(placement.nodes),
            "generation": gang.generation,
            "spareNodes": list(placement.spare_nodes) or None,
        },
        "admittedAt": timestamp(now),
    }
    if (gang.job.get("status") or {}).get("recoverFrom"):
        record["recoverFrom"] = None  # placed again: nothing is held for it any more
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
    if placement.recovered:
        metrics.SPARE_RECOVERIES.inc()
        displaced = (
            f", preempting the fillers on {', '.join(placement.displaced)}"
            if placement.displaced
            else ""
        )
        message = (
            f"The replacement gang was placed in the same {placement.level} "
            f"{placement.domain} it ran in{displaced}."
        )
        await asyncio.to_thread(kube.event, updated, "Normal", Reason.RECOVERED_ON_SPARES, message)


async def admission_loop(
    op: Operator, topology: Topology, window: int = 0, spares: SparePolicy | None = None
) -> None:
    await op.cache.synced.wait()
    while True:
        await op.admission_wanted.wait()
        await asyncio.sleep(DEBOUNCE_SECONDS)
        op.admission_wanted.clear()
        started = time.perf_counter()
        try:
            await admission_pass(op, topology, window, spares)
            log.debug("admission pass took %.3fs", time.perf_counter() - started)
        except Exception:  # never let one bad pass stop admission for everyone
            log.exception("admission pass failed; retrying")
            await asyncio.sleep(1)
            op.wake_admission()
