"""The operator's in-memory view of the cluster, fed by watches, and its work queue.

kopf's watch streams keep `Cache` current (nodes, every pod, our custom objects). Handlers
never GET what a watch already delivered; after a write they store the server's answer so the
next reconcile sees at least their own changes even before the watch event arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from phalanx import metrics, observe
from phalanx.api.pod_security import PodSecurityLevel, level_of
from phalanx.api.trainjob import LLMTrainJobSpec
from phalanx.api.validate import SpecError, parse
from phalanx.constants import LABEL_JOB, LABEL_SERVICE
from phalanx.observe import CreateRejection
from phalanx.placement import Topology
from phalanx.placement.filters import Taint, Toleration
from phalanx.plan.autoscale import Sample
from phalanx.plan.gang_progress import GangProgress
from phalanx.plan.queue_wait import Wait
from phalanx.render.trainjob import checkpoint_claim_name

log = logging.getLogger("phalanx")
Key = tuple[str, str]  # (namespace, name)
M = TypeVar("M", bound=BaseModel)
Obj = dict[str, Any]


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata", {})
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _version(obj: Obj) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


NODE_LOST_GRACE_SECONDS = 30.0
GONE_REMEMBERED = 100_000


@dataclass
class Store:
    """Objects of one kind by key, never replaced by an older resourceVersion."""

    items: dict[Key, Obj] = field(default_factory=dict)
    # UIDs seen deleted: a write's answer that arrives after the watch's DELETED event must
    # not bring the object back as a ghost. Such answers come within seconds, so only the
    # newest GONE_REMEMBERED deletions are kept (oldest forgotten first).
    gone: dict[str, None] = field(default_factory=dict)
    remember: int = GONE_REMEMBERED

    def put(self, obj: Obj) -> bool:
        key = key_of(obj)
        if obj.get("metadata", {}).get("uid") in self.gone:
            return False
        known = self.items.get(key)
        if known is not None and _version(known) > _version(obj):
            return False
        self.items[key] = obj
        return True

    def drop(self, obj: Obj) -> bool:
        """Forget an object; False when a newer object of the same name replaced it already."""
        uid = obj.get("metadata", {}).get("uid")
        if uid:
            self.gone[uid] = None
            if len(self.gone) > self.remember:
                del self.gone[next(iter(self.gone))]
        known = self.items.get(key_of(obj))
        if known is not None and uid and known.get("metadata", {}).get("uid") not in (uid, None):
            return False
        return self.items.pop(key_of(obj), None) is not None

    def get(self, key: Key) -> Obj | None:
        return self.items.get(key)

    def values(self) -> Iterable[Obj]:
        return self.items.values()


@dataclass
class Cache:
    nodes: Store = field(default_factory=Store)
    # Namespaces, for the pod security level their label gives (keys: ("", name)).
    namespaces: Store = field(default_factory=Store)
    pods: Store = field(default_factory=Store)
    trainjobs: Store = field(default_factory=Store)
    services: Store = field(default_factory=Store)
    claims: Store = field(default_factory=Store)
    # Services and ConfigMaps labelled app.kubernetes.io/managed-by=phalanx (our children).
    child_services: Store = field(default_factory=Store)
    configmaps: Store = field(default_factory=Store)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    # Until the first full list of claims arrives, a missing claim may only be unseen.
    claims_synced: bool = False
    # Pods by owning job key, kept in step with `pods`, so reconciles never scan every pod.
    _by_job: dict[Key, set[Key]] = field(default_factory=lambda: defaultdict(set))
    _by_service: dict[Key, set[Key]] = field(default_factory=lambda: defaultdict(set))

    def pod_security(self, namespace: str) -> PodSecurityLevel:
        """The level a namespace's pods are rendered for (restricted until it is seen)."""
        found = self.namespaces.get(("", namespace)) or {}
        return level_of(found.get("metadata", {}).get("labels"))

    def going(self, obj: Obj) -> bool:
        """Being deleted, or in a namespace being deleted: the namespace controller removes
        what is left, and a create there changes nothing, so nothing is planned for it."""
        if observe.terminating(obj):
            return True
        found = self.namespaces.get(("", key_of(obj)[0]))
        return found is not None and observe.terminating(found)

    def put_pod(self, pod: Obj) -> Key | None:
        """Store a pod; returns its owning job or service key, if it has one."""
        if not self.pods.put(pod):
            return None
        return self._link(pod, add=True)

    def drop_pod(self, pod: Obj) -> Key | None:
        if not self.pods.drop(pod):
            labels = pod.get("metadata", {}).get("labels") or {}
            owner = labels.get(LABEL_JOB) or labels.get(LABEL_SERVICE)
            return (key_of(pod)[0], owner) if owner else None
        return self._link(pod, add=False)

    def _link(self, pod: Obj, add: bool) -> Key | None:
        labels = pod.get("metadata", {}).get("labels") or {}
        namespace, name = key_of(pod)
        for label, index in ((LABEL_JOB, self._by_job), (LABEL_SERVICE, self._by_service)):
            owner = labels.get(label)
            if owner:
                members = index[(namespace, owner)]
                (members.add if add else members.discard)((namespace, name))
                if not members:
                    del index[(namespace, owner)]  # the owner's last pod is gone
                return namespace, owner
        return None

    def pods_of_job(self, key: Key) -> list[Obj]:
        return [p for k in sorted(self._by_job.get(key, ())) if (p := self.pods.get(k)) is not None]

    def pods_of_service(self, key: Key) -> list[Obj]:
        return [
            p for k in sorted(self._by_service.get(key, ())) if (p := self.pods.get(k)) is not None
        ]

    def claim_names(self, namespace: str) -> frozenset[str] | None:
        """Claims that exist in `namespace`, or None while that is not known yet."""
        if not self.claims_synced:
            return None
        return frozenset(name for ns, name in self.claims.items if ns == namespace)

    def checkpoint_bound(self, key: Key, spec: LLMTrainJobSpec) -> bool:
        """Whether job `key`'s checkpoint claim is bound (True without one; False unseen)."""
        name = checkpoint_claim_name(key[1], spec)
        if name is None:
            return True
        claim = self.claims.get((key[0], name))
        return claim is not None and (claim.get("status") or {}).get("phase") == "Bound"

    def seconds_until_lost(
        self, names: Iterable[str], now: datetime, grace: float = NODE_LOST_GRACE_SECONDS
    ) -> float | None:
        """For nodes NotReady but still within their grace, the time until the first counts as
        lost (when jobs on it must be looked at again); None if none is in that state."""
        waits = []
        for name in names:
            node = self.nodes.get(("", name))
            if node is not None and not observe.node_ready(node):
                remaining = grace - observe.not_ready_for(node, now)
                if remaining > 0:
                    waits.append(remaining)
        return min(waits) if waits else None

    def ready_nodes(
        self,
        now: datetime,
        grace: float = NODE_LOST_GRACE_SECONDS,
        pods: Sequence[Obj] = (),
        also: Iterable[str] = (),
    ) -> frozenset[str]:
        """Of the nodes `pods` (a gang's) are bound to, and the nodes named in `also` (its
        placement), those still trusted with running pods: Ready, or NotReady for less than
        `grace` (a job's failurePolicy.nodeLostGraceSeconds; one late heartbeat must not
        restart every gang on the node), and free of NoExecute taints that `pods` do not
        tolerate: those evict the pods at once, so the gang hears it in the same pass, not from
        the evictions one by one. Only the gang's own nodes are judged: a reconcile then costs
        what its gang holds, not what the cluster holds. New placements use only Ready nodes
        (the capacity snapshot checks for itself)."""
        tolerations = tolerations_of(pods)
        names = {observe.node_of(p) for p in pods} | set(also)
        trusted = []
        for name in names:
            node = self.nodes.get(("", name)) if name else None
            if (
                node is not None
                and (observe.node_ready(node) or observe.not_ready_for(node, now) < grace)
                and not evicting_taints(node, tolerations)
            ):
                trusted.append(name)
        return frozenset(trusted)


# The node lifecycle's NoExecute taints that follow the Ready condition: the node-lost grace
# judges those, not this check (the wider placement.filters.LIFECYCLE_TAINTS also has NoSchedule
# ones).
READINESS_TAINTS = frozenset({"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"})


def tolerations_of(pods: Iterable[Obj]) -> tuple[Toleration, ...]:
    """The tolerations every one of a gang's pods carries (its pods share one template)."""
    common: set[Toleration] | None = None
    for pod in pods:
        own = {Toleration.of(t) for t in (pod.get("spec") or {}).get("tolerations") or []}
        common = own if common is None else common & own
    return tuple(common or ())


def evicting_taints(node: Obj, tolerations: Iterable[Toleration]) -> list[Taint]:
    """The node's NoExecute taints that `tolerations` do not tolerate (for any time: a bounded
    toleration lets the pods stay until the taint manager's deadline)."""
    tolerations = tuple(tolerations)
    taints = [Taint.of(t) for t in (node.get("spec") or {}).get("taints") or []]
    return [
        t
        for t in taints
        if t.effect == "NoExecute"
        and t.key not in READINESS_TAINTS
        and not any(tol.tolerates(t) for tol in tolerations)
    ]


async def run_reconcile(
    controller: str, kind: str, queue: WorkQueue, key: Key, body: Callable[[], Awaitable[None]]
) -> None:
    """Run one reconcile with controller-runtime's metrics; a failure retries the key later."""
    started = time.perf_counter()
    result = "success"
    try:
        await body()
    except Exception:  # a bug or an API outage must not stop the worker
        result = "error"
        log.exception("reconciling %s %s/%s failed; retrying", kind, *key)
        queue.add_after(key, 5)
    finally:
        metrics.RECONCILE_TOTAL.labels(controller=controller, result=result).inc()
        metrics.RECONCILE_TIME.labels(controller=controller).observe(time.perf_counter() - started)


class WorkQueue:
    """Keys to reconcile: deduplicated, one worker per key at a time, optional delay."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._pending: set[Key] = set()
        self._active: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def add(self, key: Key) -> None:
        if key in self._active:
            self._dirty.add(key)  # reconcile once more after the running pass
        elif key not in self._pending:
            self._pending.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Key, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        due = loop.time() + seconds
        if timer is not None and timer.when() <= due:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(due, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def worker(self, reconcile: Callable[[Key], Awaitable[None]]) -> None:
        while True:
            key = await self._queue.get()
            self._pending.discard(key)
            self._active.add(key)
            try:
                await reconcile(key)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)

    def __len__(self) -> int:
        return len(self._pending)


@dataclass
class Operator:
    """Everything the handlers share within one operator process."""

    cache: Cache = field(default_factory=Cache)
    trainjobs: WorkQueue = field(default_factory=WorkQueue)
    services: WorkQueue = field(default_factory=WorkQueue)
    # Latest admission verdict per waiting gang: (reason, message).
    verdicts: dict[Key, tuple[str, str]] = field(default_factory=dict)
    # The gang generation of each job the admission loop looked at before its pods existed
    # and did not place: its pods are created gated and wait in the queue.
    declined: dict[Key, int] = field(default_factory=dict)
    progress: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # Every rank's /progress of each running gang, and when its step last moved.
    gangs: dict[Key, GangProgress] = field(default_factory=dict)
    # Latest admission verdict of a waiting multi-pod group, per InferenceService.
    service_verdicts: dict[Key, tuple[str, str]] = field(default_factory=dict)
    # Recent load samples per InferenceService, oldest first (the autoscaler's input).
    samples: dict[Key, list[Sample]] = field(default_factory=dict)
    # Hash of what was last applied to children the operator cannot watch (PodGroups), per
    # owner uid; and children whose exact content the API server refused. Pruned by `forget`.
    applied: dict[str, dict[tuple[str, str], str]] = field(default_factory=dict)
    refused_children: dict[tuple[str, str, str], str] = field(default_factory=dict)
    # The API server's latest refusal to create a pod, per job / service (cleared on success).
    rejections: dict[Key, CreateRejection] = field(default_factory=dict)
    service_rejections: dict[Key, CreateRejection] = field(default_factory=dict)
    # The one clock of the shell; tests substitute their own.
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # When each gang's admission verdict was last written (rate limit).
    verdict_written: dict[Key, float] = field(default_factory=dict)
    # Queue position and estimated start of each queued gang, by request key, and when they
    # were last estimated (handlers/queue_wait.py).
    waits: dict[str, Wait] = field(default_factory=dict)
    waits_at: float = 0.0
    waits_timer: asyncio.TimerHandle | None = None
    # Every parsed object (or why it does not parse) by (uid, generation): the one way specs
    # are read, once per generation, however many passes and loops look at them.
    specs: dict[tuple[str, int], Any] = field(default_factory=dict)
    admission_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.monotonic)
    # The operator's topology (PHALANX_TOPOLOGY), set at startup.
    topology: Topology | None = None

    def wake_admission(self) -> None:
        self.admission_wanted.set()

    def parsed(self, obj: Obj, model: type[M]) -> M | SpecError:
        """The validated model of `obj`, memoised per (uid, generation); older generations of
        the same object are dropped when a new one is parsed."""
        meta = obj["metadata"]
        uid, generation = str(meta.get("uid") or ""), int(meta.get("generation") or 0)
        if not uid:  # not from the API server (every stored object has a uid): no memo
            try:
                return cast(M, parse(obj, model))
            except SpecError as error:
                return error
        key = (uid, generation)
        if key not in self.specs:
            for stale in [k for k in self.specs if k[0] == uid]:
                del self.specs[stale]
            try:
                self.specs[key] = parse(obj, model)
            except SpecError as error:
                self.specs[key] = error
        found = self.specs[key]
        if not isinstance(found, model | SpecError):
            raise TypeError(f"{uid} was parsed as {type(found).__name__}, not {model.__name__}")
        return found

    def forget_trainjob(self, key: Key, uid: str) -> None:
        """Drop everything held for a job that is gone (by key and by uid)."""
        self.verdicts.pop(key, None)
        self.declined.pop(key, None)
        self.progress.pop(key, None)
        self.gangs.pop(key, None)
        self.rejections.pop(key, None)
        self.verdict_written.pop(key, None)
        self._forget_uid(uid)

    def forget_service(self, key: Key, uid: str) -> None:
        self.service_verdicts.pop(key, None)
        self.samples.pop(key, None)
        self.service_rejections.pop(key, None)
        self.verdict_written.pop(key, None)
        self._forget_uid(uid)

    def _forget_uid(self, uid: str) -> None:
        self.applied.pop(uid, None)
        for refused in [k for k in self.refused_children if k[0] == uid]:
            del self.refused_children[refused]
        for spec in [k for k in self.specs if k[0] == uid]:
            del self.specs[spec]
