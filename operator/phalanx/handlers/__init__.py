"""kopf wiring: watches feed the cache and enqueue work; background tasks do the rest.

Run with `phalanx operator run` (or `kopf run --standalone -m phalanx.handlers`). Settings come
from the environment (set by the CLI flags or the Helm chart's ConfigMap):
PHALANX_TOPOLOGY (preset or explicit levels), PHALANX_METRICS_PORT (0 disables /metrics),
PHALANX_WORKERS, PHALANX_ADMISSION_WINDOW, PHALANX_PROGRESS_INTERVAL (0 disables polling),
PHALANX_PROGRESS_BUDGET (progress poll requests per second over every gang, see `progress`),
PHALANX_SCRAPE_INTERVAL (0 disables the autoscaler's metrics scraping) and
PHALANX_SCRAPE_LOOPBACK_ONLY (1: scrape loopback pod addresses only) and PHALANX_LEADER_ELECTION
(1: replicas elect one leader over a Lease, see `leader`) and PHALANX_SPARES (``level=count``:
whole nodes per domain kept free for recovery, see `placement.spares`; a bad value stops the
operator at startup with the setting named) and PHALANX_WATCH_NAMESPACES (the CLI's
``--namespace`` patterns as a JSON list, set by `phalanx operator run`; empty: every namespace).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
from kopf._cogs.structs.references import NamespaceName, match_namespace

from phalanx import kube, metrics
from phalanx.constants import (
    GROUP,
    INFERENCE_KIND,
    INFERENCE_PLURAL,
    LABEL_JOB,
    LABEL_SERVICE,
    TRAINJOB_KIND,
    TRAINJOB_PLURAL,
    VERSION,
)
from phalanx.placement import SPARES_ENV, SparePolicy, Topology

from . import admission, inference, leader, progress, scraper, trainjob
from .state import NODE_LOST_GRACE_SECONDS, Operator, key_of

log = logging.getLogger("phalanx")
# Our Services and ConfigMaps carry this label; their watches ask the API server for no others.
CHILD_SELECTOR = "app.kubernetes.io/managed-by=phalanx"


def topology_from_env() -> Topology:
    return Topology.parse(os.environ.get("PHALANX_TOPOLOGY", "generic"))


def spares_from_env(topology: Topology) -> SparePolicy | None:
    return SparePolicy.parse(os.environ.get(SPARES_ENV, ""), topology)


PROGRESS_BUDGET_ENV = "PHALANX_PROGRESS_BUDGET"


def progress_budget_from_env() -> float:
    """Progress poll requests per second; a value that is not a positive number is refused
    with the setting named (a budget of none would never poll)."""
    raw = os.environ.get(PROGRESS_BUDGET_ENV, str(progress.BUDGET_PER_SECOND))
    try:
        budget = float(raw)
    except ValueError:
        budget = math.nan
    if not budget > 0 or math.isinf(budget):
        raise ValueError(
            f"{PROGRESS_BUDGET_ENV}={raw!r}: expected a positive number of requests per second"
        )
    return budget


WATCH_NAMESPACES_ENV = "PHALANX_WATCH_NAMESPACES"


def watched_from_env() -> Callable[[str], bool]:
    """Whether kopf watches a namespace under the `--namespace` patterns (a JSON list in
    PHALANX_WATCH_NAMESPACES; none: every namespace), judged by kopf's own matcher so the
    answer is kopf's: globs, ``!`` exclusions, comma-separated parts."""
    patterns = json.loads(os.environ.get(WATCH_NAMESPACES_ENV) or "[]")
    if not patterns:
        return lambda _: True
    return lambda namespace: any(
        match_namespace(NamespaceName(namespace), pattern) for pattern in patterns
    )


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """Log kopf in with the credentials `phalanx.kube` uses (kubeconfig token or client
    certificate, else the in-cluster service account; see `kube.credentials_of`).

    `kubernetes.config` reads $KUBECONFIG once, when it is first imported, so kopf's built-in
    login misses a KUBECONFIG set later (as embedding programs and test fixtures do). kopf
    logs in again on a 401, which re-reads a rotated service-account token.
    """
    c = kube.credentials_of(kube.connect().configuration)
    return kopf.ConnectionInfo(
        server=c.server,
        ca_path=c.ca_path,
        insecure=c.insecure,
        certificate_path=c.certificate_path,
        private_key_path=c.private_key_path,
        scheme=c.scheme,
        token=c.token,
        username=c.username,
        password=c.password,
    )


@kopf.on.probe(id="api")
def api_probe(**_: Any) -> str:
    """Liveness: /healthz fails while the API server is unreachable or refuses us."""
    try:
        kube.check_access()
    except Exception as error:
        # Permanent: a retried probe would hold the health request open instead of failing it.
        raise kopf.PermanentError(f"the API server cannot be used: {error}") from error
    return "ok"


def _op(memo: kopf.Memo) -> Operator:
    """The operator's state lives in kopf's memo: one per operator run, no module globals."""
    op = memo["op"]
    assert isinstance(op, Operator)
    return op


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    op = memo["op"] = Operator()
    tasks: list[asyncio.Task[None]] = []
    memo["tasks"] = tasks
    settings.watching.label_selectors["", "v1", "services"] = CHILD_SELECTOR
    settings.watching.label_selectors["", "v1", "configmaps"] = CHILD_SELECTOR
    settings.posting.level = logging.WARNING
    # Every watch event runs a handler; their per-event success lines would drown the log.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.watching.server_timeout = 300
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # The official client is synchronous; give its calls room to run side by side.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=32)
    )
    await asyncio.to_thread(kube.connect)
    port = int(os.environ.get("PHALANX_METRICS_PORT", "8080"))
    if port:
        try:
            metrics.serve(port)
        except OSError as error:
            log.warning("metrics endpoint on :%d not started: %s", port, error)
    topology = op.topology = topology_from_env()
    try:
        spares = spares_from_env(topology)
        budget = progress_budget_from_env()
    except ValueError as error:  # refused, never ignored: the operator does not start
        raise kopf.PermanentError(str(error)) from error
    workers = int(os.environ.get("PHALANX_WORKERS", "8"))
    window = int(os.environ.get("PHALANX_ADMISSION_WINDOW", "0"))
    interval = float(os.environ.get("PHALANX_PROGRESS_INTERVAL", str(progress.INTERVAL_SECONDS)))
    scrape = float(os.environ.get("PHALANX_SCRAPE_INTERVAL", str(scraper.INTERVAL_SECONDS)))
    loopback = os.environ.get("PHALANX_SCRAPE_LOOPBACK_ONLY") == "1"

    def decide() -> list[asyncio.Task[None]]:
        """The tasks that act on the cluster: only one replica runs them at a time."""
        # A leader taking over (or back) looks at everything once: keys a cancelled worker
        # held, and events that arrived while it stood by, are not lost.
        for key in list(op.cache.trainjobs.items):
            op.trainjobs.add(key)
        for key in list(op.cache.services.items):
            op.services.add(key)
        op.wake_admission()
        started = [
            *(
                asyncio.create_task(
                    _after_sync(
                        op, lambda: op.trainjobs.worker(lambda k: trainjob.reconcile(op, k))
                    )
                )
                for _ in range(workers)
            ),
            *(
                asyncio.create_task(
                    _after_sync(
                        op, lambda: op.services.worker(lambda k: inference.reconcile(op, k))
                    )
                )
                for _ in range(workers)
            ),
            asyncio.create_task(admission.admission_loop(op, topology, window, spares)),
        ]
        if interval > 0:
            started.append(asyncio.create_task(progress.progress_loop(op, interval, budget)))
        if scrape > 0:
            started.append(asyncio.create_task(scraper.scraper_loop(op, scrape, loopback)))
        return started

    # Every replica fills its cache; with leader election only the Lease holder decides.
    tasks.extend(
        [
            asyncio.create_task(_mark_synced(op, watched_from_env())),
            asyncio.create_task(_export_gauges(op)),
        ]
    )
    election = memo["election"] = leader.LeaderElection.from_env()
    if election is None:
        metrics.LEADER.set(1)
        tasks.extend(decide())
    else:
        tasks.append(asyncio.create_task(leader.lead(election, decide)))
    log.info(
        "phalanx operator started (topology: %s, spares: %s, %d workers)",
        topology, spares or "none", workers,
    )  # fmt: skip


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    tasks: list[asyncio.Task[None]] = memo.get("tasks") or []
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()
    election = memo.get("election")
    if isinstance(election, leader.LeaderElection):
        try:
            await asyncio.to_thread(election.release)
        except Exception as error:  # the standby then waits for the Lease to expire instead
            log.warning("handing back the lease failed: %s", error)


async def _after_sync(op: Operator, work: Callable[[], Awaitable[None]]) -> None:
    """Run `work` once the caches hold their first lists (created only then, so a task
    cancelled while waiting leaves no coroutine behind that never ran)."""
    await op.cache.synced.wait()
    await work()


SYNC_RETRY_SECONDS = (1.0, 2.0, 5.0)


async def _list_until_answered(kind: str) -> list[dict[str, Any]]:
    """The first full list of one kind; an unreachable API server is waited out, not fatal."""
    for attempt in itertools.count():
        try:
            return await asyncio.to_thread(kube.list_all, kind)
        except Exception as error:  # the API server may be briefly unreachable at start
            delay = SYNC_RETRY_SECONDS[min(attempt, len(SYNC_RETRY_SECONDS) - 1)]
            log.warning("listing %s failed (%s); retrying in %.0fs", kind, error, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _mark_synced(op: Operator, in_scope: Callable[[str], bool]) -> None:
    """Decide nothing before the world is known. Until nodes, pods and both custom resources
    have been listed once, a Ready node would read as lost, a live pod as missing, a recorded
    placement as free capacity: no reconcile, creation, restart or admission happens before.

    The lists are cluster-wide (pods of every namespace hold capacity), but only the jobs and
    services of watched namespaces are this operator's: kopf sends no events about the others,
    and the operator may not write there."""
    nodes, namespaces, pods, jobs, services = await asyncio.gather(
        *(
            _list_until_answered(kind)
            for kind in ("Node", "Namespace", "Pod", TRAINJOB_KIND, INFERENCE_KIND)
        )
    )
    for node in nodes:
        op.cache.nodes.put(node)
    for namespace in namespaces:  # each one's pod security level, before any pod is rendered
        op.cache.namespaces.put(namespace)
    for pod in pods:
        op.cache.put_pod(pod)
    for job in jobs:
        if in_scope(key_of(job)[0]):
            op.cache.trainjobs.put(job)
    for service in services:
        if in_scope(key_of(service)[0]):
            op.cache.services.put(service)
    op.cache.synced.set()
    for key in list(op.cache.trainjobs.items):
        op.trainjobs.add(key)
    for key in list(op.cache.services.items):
        op.services.add(key)
    op.wake_admission()
    claims = await _list_until_answered("PersistentVolumeClaim")
    for claim in claims:
        op.cache.claims.put(claim)
    op.cache.claims_synced = True
    for key in list(op.cache.services.items):
        op.services.add(key)  # a claim reported missing before the list arrived may exist


async def _export_gauges(op: Operator) -> None:
    while True:
        counts = trainjob.phase_counts(op)
        for phase in (
            "Pending",
            "Queued",
            "Starting",
            "Running",
            "Restarting",
            "Suspended",
            "Succeeded",
            "Failed",
            "Invalid",
        ):
            metrics.TRAINJOBS.labels(phase=phase).set(counts.get(phase, 0))
        held = sum(
            int((j.get("status") or {}).get("accelerators") or 0)
            for j in op.cache.trainjobs.values()
        )
        metrics.GPUS_ALLOCATED.set(held)
        await asyncio.sleep(5)


# Watch handlers are coroutines on purpose: they touch asyncio queues and events, which are
# not thread-safe, and kopf runs plain functions in a thread pool.
@kopf.on.event(GROUP, VERSION, TRAINJOB_PLURAL)
async def trainjob_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj: dict[str, Any] = dict(event["object"])
    if event.get("type") == "DELETED":
        op.cache.trainjobs.drop(obj)
        op.forget_trainjob(key_of(obj), str(obj["metadata"].get("uid") or ""))
        op.wake_admission()
        for key in inference.services_using_job(op, *key_of(obj)):
            op.services.add(key)
        return
    op.cache.trainjobs.put(obj)
    op.trainjobs.add(key_of(obj))
    # Services waiting for this job's export look again.
    for key in inference.services_using_job(op, *key_of(obj)):
        op.services.add(key)


@kopf.on.event(GROUP, VERSION, INFERENCE_PLURAL)
async def inference_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj: dict[str, Any] = dict(event["object"])
    if event.get("type") == "DELETED":
        op.cache.services.drop(obj)
        inference.forget(op, key_of(obj), str(obj["metadata"].get("uid") or ""))
        op.wake_admission()
        return
    op.cache.services.put(obj)
    op.services.add(key_of(obj))


@kopf.on.event("", "v1", "persistentvolumeclaims")
async def claim_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj: dict[str, Any] = dict(event["object"])
    if event.get("type") == "DELETED":
        op.cache.claims.drop(obj)
    else:
        op.cache.claims.put(obj)
    # A job's checkpoint claim has no owner (it outlives the job); its label names the job.
    job = (obj["metadata"].get("labels") or {}).get(LABEL_JOB)
    if job:
        op.trainjobs.add((key_of(obj)[0], job))
    # Services of this namespace may serve from this claim, directly or through a train job.
    for key in inference.services_in(op, key_of(obj)[0]):
        op.services.add(key)


def _requeue_owner(op: Operator, obj: dict[str, Any]) -> None:
    """A child changed or vanished: its owner's next pass puts it back as rendered."""
    namespace = key_of(obj)[0]
    for ref in obj["metadata"].get("ownerReferences") or []:
        if not ref.get("controller") or ref.get("apiVersion") != f"{GROUP}/{VERSION}":
            continue
        if ref.get("kind") == TRAINJOB_KIND:
            op.trainjobs.add((namespace, ref["name"]))
        elif ref.get("kind") == INFERENCE_KIND:
            op.services.add((namespace, ref["name"]))


@kopf.on.event("", "v1", "services")
async def child_service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj: dict[str, Any] = dict(event["object"])
    if event.get("type") == "DELETED":
        op.cache.child_services.drop(obj)
    else:
        op.cache.child_services.put(obj)
    _requeue_owner(op, obj)


@kopf.on.event("", "v1", "configmaps")
async def child_configmap_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj: dict[str, Any] = dict(event["object"])
    if event.get("type") == "DELETED":
        op.cache.configmaps.drop(obj)
    else:
        op.cache.configmaps.put(obj)
    _requeue_owner(op, obj)


@kopf.on.event("", "v1", "pods")
async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj: dict[str, Any] = dict(event["object"])
    owner = op.cache.drop_pod(obj) if event.get("type") == "DELETED" else op.cache.put_pod(obj)
    labels = obj.get("metadata", {}).get("labels") or {}
    if owner is not None and LABEL_JOB in labels:
        op.trainjobs.add(owner)
    elif owner is not None and LABEL_SERVICE in labels:
        op.services.add(owner)
    if event.get("type") == "DELETED" or (obj.get("status") or {}).get("phase") in (
        "Succeeded",
        "Failed",
    ):
        op.wake_admission()


@kopf.on.event("", "v1", "namespaces")
async def namespace_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A namespace's pod security label decides what its pods may be rendered with: when the
    level changes, its jobs and services look again (a refused template may now run; pods
    rendered from then on follow the new level)."""
    op = _op(memo)
    obj: dict[str, Any] = dict(event["object"])
    name = key_of(obj)[1]
    before = op.cache.pod_security(name)
    if event.get("type") == "DELETED":
        op.cache.namespaces.drop(obj)
    else:
        op.cache.namespaces.put(obj)
    if op.cache.pod_security(name) == before:
        return
    for key in [k for k in list(op.cache.trainjobs.items) if k[0] == name]:
        op.trainjobs.add(key)
    for key in inference.services_in(op, name):
        op.services.add(key)


@kopf.on.event("", "v1", "nodes")
async def node_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    op = _op(memo)
    obj: dict[str, Any] = dict(event["object"])
    if event.get("type") == "DELETED":
        op.cache.nodes.drop(obj)
    else:
        before = op.cache.nodes.get(key_of(obj))
        op.cache.nodes.put(obj)
        if (
            before is not None
            and _health(before) == _health(obj)
            and _capacity(before) == _capacity(obj)
        ):
            return  # a heartbeat: nothing placement or jobs care about
    op.wake_admission()
    # Jobs with pods on this node may have lost a rank.
    node_name = key_of(obj)[1]
    for pod in list(op.cache.pods.values()):
        if pod.get("spec", {}).get("nodeName") == node_name:
            labels = pod["metadata"].get("labels") or {}
            if labels.get(LABEL_JOB):
                job = (pod["metadata"]["namespace"], labels[LABEL_JOB])
                op.trainjobs.add(job)
                # Look again once a NotReady node has been gone long enough to count as lost.
                op.trainjobs.add_after(job, NODE_LOST_GRACE_SECONDS + 1)
            elif labels.get(LABEL_SERVICE):
                op.services.add((pod["metadata"]["namespace"], labels[LABEL_SERVICE]))


def _health(node: dict[str, Any]) -> tuple[Any, ...]:
    spec = node.get("spec") or {}
    ready = [
        c.get("status")
        for c in (node.get("status") or {}).get("conditions") or []
        if c.get("type") == "Ready"
    ]
    return (tuple(ready), bool(spec.get("unschedulable")), str(spec.get("taints")))


def _capacity(node: dict[str, Any]) -> Any:
    return (
        (node.get("status") or {}).get("allocatable"),
        (node.get("metadata") or {}).get("labels"),
    )
