"""The shell's own machinery without a cluster: the work queue, the object store, node
health with an injected clock, what the operator forgets when an owner is gone, and the
admission shell's rate limit and spec memo."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from builders import make_job, node, pod

from phalanx.handlers import WATCH_NAMESPACES_ENV, admission, watched_from_env
from phalanx.handlers.apply import APPLIED_HASH, with_hash
from phalanx.handlers.state import Operator, Store, WorkQueue
from phalanx.observe import CreateRejection
from phalanx.placement import SparePolicy, Unplaceable
from phalanx.plan.queue_wait import Wait

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def obj(name: str, version: int, uid: str = "u1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ml", "uid": uid, "resourceVersion": str(version)}
    }


def test_store_keeps_the_newest_version_and_never_revives_a_deleted_object() -> None:
    store = Store()
    assert store.put(obj("a", 5))
    assert not store.put(obj("a", 4)), "an older answer must not replace a newer one"
    assert store.get(("ml", "a")) == obj("a", 5)
    assert store.drop(obj("a", 5))
    assert not store.put(obj("a", 6)), "a late write answer must not bring back a ghost"
    assert store.put(obj("a", 7, uid="u2")), "a new object of the same name is welcome"


def test_work_queue_deduplicates_and_reruns_a_key_dirtied_while_active() -> None:
    async def scenario() -> list[tuple[str, str]]:
        queue = WorkQueue()
        seen: list[tuple[str, str]] = []
        done = asyncio.Event()

        async def reconcile(key: tuple[str, str]) -> None:
            seen.append(key)
            if len(seen) == 1:
                queue.add(key)  # changed while being reconciled: once more afterwards
            if len(seen) == 3:
                done.set()

        queue.add(("ml", "a"))
        queue.add(("ml", "a"))  # deduplicated while pending
        queue.add_after(("ml", "b"), 0.05)
        queue.add_after(("ml", "b"), 10)  # a later timer never postpones an earlier one
        worker = asyncio.create_task(queue.worker(reconcile))
        await asyncio.wait_for(done.wait(), 5)
        worker.cancel()
        return seen

    assert asyncio.run(scenario()) == [("ml", "a"), ("ml", "a"), ("ml", "b")]


def test_ready_nodes_include_a_node_within_its_grace_and_say_when_it_runs_out() -> None:
    op = Operator()
    op.cache.nodes.put(node("up", True, NOW - timedelta(hours=1)))
    op.cache.nodes.put(node("late", False, NOW - timedelta(seconds=10)))
    op.cache.nodes.put(node("gone", False, NOW - timedelta(seconds=31)))
    assert op.cache.ready_nodes(NOW, also=["up", "late", "gone"]) == frozenset({"up", "late"})
    # Only the gang's own nodes are judged: those its pods are bound to and those named.
    assert op.cache.ready_nodes(NOW, pods=[pod("j", 0, node="late")]) == {"late"}
    assert op.cache.ready_nodes(NOW, also=["missing"]) == frozenset()
    assert op.cache.seconds_until_lost(["up", "late", "gone"], NOW) == pytest.approx(20)


def test_a_no_execute_taint_the_gang_does_not_tolerate_loses_the_node_at_once() -> None:
    op = Operator()
    health = {"key": "gpu-health", "value": "bad", "effect": "NoExecute"}
    for name, taints in (
        ("healthy", []),
        ("sick", [health]),
        ("cordoned", [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]),
        # The node lifecycle's own taint: the Ready condition and its grace decide.
        ("lifecycle", [{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]),
    ):
        up = node(name, True, NOW - timedelta(hours=1))
        up["spec"] = {"taints": taints}
        op.cache.nodes.put(up)
    rank = pod("j", 0, node="healthy")
    every = ["healthy", "sick", "cordoned", "lifecycle"]
    assert op.cache.ready_nodes(NOW, pods=[rank], also=every) == {
        "healthy",
        "cordoned",
        "lifecycle",
    }
    tolerant = pod("j", 1, node="healthy")
    tolerant["spec"]["tolerations"] = [
        {"key": "gpu-health", "operator": "Exists", "effect": "NoExecute"}
    ]
    assert "sick" in op.cache.ready_nodes(NOW, pods=[tolerant], also=every)
    # Only what every pod of the gang tolerates counts.
    assert "sick" not in op.cache.ready_nodes(NOW, pods=[tolerant, rank], also=every)


def test_forgetting_a_job_drops_everything_kept_for_it() -> None:
    op = Operator()
    key = ("ml", "j")
    op.verdicts[key] = ("Queued", "waiting")
    op.progress[key] = {"step": 1}
    op.rejections[key] = CreateRejection("Pod j-0", 422, "bad", 1, NOW, 1)
    op.verdict_written[key] = 1.0
    op.applied["uid-1"] = {("PodGroup", "j"): "abc"}
    op.refused_children[("uid-1", "Service", "j")] = "abc"
    op.specs[("uid-1", 1)] = None
    op.specs[("uid-2", 1)] = None
    op.forget_trainjob(key, "uid-1")
    assert (op.verdicts, op.progress, op.rejections, op.verdict_written) == ({}, {}, {}, {})
    assert (op.applied, op.refused_children, op.specs) == ({}, {}, {("uid-2", 1): None})


def test_applied_hash_follows_the_rendered_content() -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"a": 1}}
    first = with_hash(service)["metadata"]["annotations"][APPLIED_HASH]
    assert with_hash(dict(service))["metadata"]["annotations"][APPLIED_HASH] == first
    changed = with_hash({**service, "spec": {"a": 2}})["metadata"]["annotations"][APPLIED_HASH]
    assert changed != first
    assert "annotations" not in service["metadata"], "the rendered object is not modified"


def test_admission_verdict_rewording_is_rate_limited_by_the_injected_clock() -> None:
    now = [NOW]
    op = Operator(clock=lambda: now[0])
    job = make_job("j", nodes=2).manifest()
    gang = admission.Gang(("ml", "j"), job, make_job("j", nodes=2).build(), 1, [])

    def verdict(message: str) -> None:
        admission._remember_verdict(op, gang, Unplaceable("InsufficientCapacity", message, False))

    verdict("3 free")
    assert len(op.trainjobs) == 1, "a new reason is written at once"
    asyncio.run(_drain(op.trainjobs))
    verdict("2 free")
    assert len(op.trainjobs) == 0, "a reworded message waits"
    now[0] = NOW + timedelta(seconds=admission.VERDICT_REFRESH_SECONDS)
    verdict("1 free")
    assert len(op.trainjobs) == 1
    assert op.verdicts[("ml", "j")] == ("InsufficientCapacity", "1 free")


def test_a_deep_queue_rewords_each_verdict_less_often() -> None:
    assert admission.verdict_refresh_seconds(10) == admission.VERDICT_REFRESH_SECONDS
    # 5,000 waiting gangs: each is reworded every 2,500 s, 2 writes a second in all.
    assert admission.verdict_refresh_seconds(5000) == 5000 / admission.VERDICT_REWORDS_PER_SECOND
    now = [NOW]
    op = Operator(clock=lambda: now[0])
    gang = admission.Gang(("ml", "j"), make_job("j").manifest(), make_job("j").build(), 1, [])
    refresh = admission.verdict_refresh_seconds(5000)

    def verdict(message: str) -> None:
        admission._remember_verdict(
            op, gang, Unplaceable("InsufficientCapacity", message, False), refresh
        )

    verdict("3 free")
    asyncio.run(_drain(op.trainjobs))
    now[0] = NOW + timedelta(seconds=admission.VERDICT_REFRESH_SECONDS)
    verdict("2 free")
    assert len(op.trainjobs) == 0, "30 s is not enough at this depth"
    now[0] = NOW + timedelta(seconds=refresh)
    verdict("1 free")
    assert len(op.trainjobs) == 1
    admission._remember_verdict(op, gang, Unplaceable("QueuedBehindHigherPriority", "x", False))
    assert op.verdicts[("ml", "j")][0] == "QueuedBehindHigherPriority", "a new reason: at once"


def test_admission_parses_a_spec_once_per_generation_and_drops_old_ones() -> None:
    op = Operator()
    job = make_job("j", nodes=2).manifest()
    first = admission._spec_of(op, job)
    assert first is not None
    assert admission._spec_of(op, job) is first
    job["metadata"]["generation"] = 2
    assert admission._spec_of(op, job) is not first
    assert list(op.specs) == [("uid-1", 2)]


async def _drain(queue: WorkQueue) -> None:
    async def nothing(_: tuple[str, str]) -> None:
        return None

    worker = asyncio.create_task(queue.worker(nothing))
    while len(queue):
        await asyncio.sleep(0)
    worker.cancel()


def test_admission_queues_whole_gated_gangs_and_finishes_recorded_ones_first() -> None:
    op = Operator()
    waiting = make_job("wait", nodes=2, topology={"preferredWaitSeconds": 30}).manifest()
    waiting["status"] = {"gangGeneration": 1, "queuedAt": "2026-01-01T11:59:00Z"}
    recorded = make_job("half", nodes=2).manifest()
    recorded["metadata"]["uid"] = "uid-2"
    recorded["status"] = {
        "gangGeneration": 1,
        "placement": {"nodes": ["n1", "n2"], "generation": 1},
    }
    partial = make_job("part", nodes=2).manifest()  # one pod not created yet: not a gang
    partial["metadata"]["uid"] = "uid-3"
    for job in (waiting, recorded, partial):
        op.cache.trainjobs.put(job)
    for p in (pod("wait", 0, gated=True), pod("wait", 1, gated=True)):
        op.cache.put_pod(p)
    for p in (pod("half", 0, gated=False, node="n1"), pod("half", 1, gated=True)):
        op.cache.put_pod(p)
    op.cache.put_pod(pod("part", 0, gated=True))
    queued, unfinished = admission.queued_gangs(op)
    assert [g.key for g in queued] == [("ml", "wait")]
    assert [g.key for g in unfinished] == [("ml", "half")]
    request = admission.request_for(queued[0])
    assert (request.key, request.pods, request.preferred_wait) == ("ml/wait", 2, 30.0)
    assert request.created == datetime(2026, 1, 1, 11, 59, tzinfo=UTC).timestamp()


def test_admission_places_a_gang_before_its_pods_exist_when_they_can_be_created_bound() -> None:
    op = Operator()
    op.cache.claims_synced = True
    bare = make_job("bare", nodes=2, checkpoint={"enabled": False}).manifest()
    bare["status"] = {"gangGeneration": 1}
    claimed = make_job("claimed", nodes=2).manifest()  # its checkpoint claim is not bound yet
    claimed["metadata"]["uid"] = "uid-2"
    creating = make_job("creating", nodes=2, checkpoint={"enabled": False}).manifest()
    creating["metadata"]["uid"] = "uid-3"
    creating["status"] = {
        "gangGeneration": 1,
        "placement": {"nodes": ["n1", "n2"], "generation": 1},
    }
    for job in (bare, claimed, creating):
        op.cache.trainjobs.put(job)
    op.cache.put_pod(pod("creating", 0, gated=False, node="n1"))
    queued, unfinished = admission.queued_gangs(op)
    assert [g.key for g in queued] == [("ml", "bare")]
    assert [(g.key, g.missing()) for g in unfinished] == [(("ml", "creating"), [1])]
    # Its shape comes from rank 0's pod as it would be created.
    request = admission.request_for(queued[0])
    assert (request.pods, request.per_pod["nvidia.com/gpu"]) == (2, 8)
    # Not placed: declined for this gang, its reconcile creates the pods gated.
    admission._remember_verdict(op, queued[0], Unplaceable("InsufficientCapacity", "full", False))
    assert op.declined == {("ml", "bare"): 1}
    assert ("ml", "bare") in op.trainjobs._pending
    assert admission.queued_gangs(op)[0] == []


def test_nothing_is_placed_or_finished_in_a_namespace_being_deleted() -> None:
    # Creates there change nothing: planning them would only repeat them until the
    # namespace controller has deleted the job.
    op = Operator()
    op.cache.claims_synced = True
    bare = make_job("bare", nodes=2, checkpoint={"enabled": False}).manifest()
    bare["status"] = {"gangGeneration": 1}
    creating = make_job("creating", nodes=2, checkpoint={"enabled": False}).manifest()
    creating["metadata"]["uid"] = "uid-2"
    creating["status"] = {
        "gangGeneration": 1,
        "placement": {"nodes": ["n1", "n2"], "generation": 1},
    }
    for job in (bare, creating):
        op.cache.trainjobs.put(job)
    op.cache.put_pod(pod("creating", 0, gated=False, node="n1"))
    namespace = {"metadata": {"name": "ml", "resourceVersion": "1"}}
    op.cache.namespaces.put(namespace)
    assert [len(gangs) for gangs in admission.queued_gangs(op)] == [1, 1]
    assert not op.cache.going(bare)
    op.cache.namespaces.put(
        {"metadata": {**namespace["metadata"], "resourceVersion": "2", "deletionTimestamp": "x"}}
    )
    assert admission.queued_gangs(op) == ([], [])
    assert op.cache.going(bare)
    assert op.cache.going(creating)


@pytest.mark.parametrize(
    ("wait", "holds"),
    [
        pytest.param(None, True, id="not-estimated-yet-holds"),
        pytest.param(Wait(3), False, id="no-start-estimate-holds-nothing"),
        pytest.param(Wait(3, datetime(2026, 1, 1, tzinfo=UTC), "ml/other"), True, id="estimated"),
    ],
)
def test_a_gang_holds_its_domain_unless_nobody_is_known_to_free_it(
    wait: Wait | None, holds: bool
) -> None:
    op = Operator()
    op.cache.trainjobs.put(make_job("wait", nodes=2).manifest())
    for p in (pod("wait", 0, gated=True), pod("wait", 1, gated=True)):
        op.cache.put_pod(p)
    if wait is not None:
        op.waits["ml/wait"] = wait
    queued, _ = admission.queued_gangs(op)
    assert admission.request_for(queued[0], op=op).holds is holds


@pytest.mark.parametrize(
    ("policy", "own", "kept"),
    [
        pytest.param(None, 0, set(), id="no-spares-its-nodes-stay-open-to-it"),
        pytest.param(SparePolicy("rack", 1), 0, {"n1", "n2"}, id="spare-policy"),
        pytest.param(None, 1, {"n1", "n2"}, id="its-own-spares"),
    ],
)
def test_a_recovering_gangs_nodes_are_kept_for_it_only_where_it_is_placed_as_a_recovery(
    policy: SparePolicy | None, own: int, kept: set[str]
) -> None:
    # Without a spare policy or spares of its own the replacement is an ordinary gang: keeping
    # its old nodes from everyone would keep them from it too (a 2-node cluster never
    # placed a restarted 2-node gang again).
    op = Operator()
    job = make_job("resume", nodes=2, failurePolicy={"spares": own}).manifest()
    job["status"] = {
        "gangGeneration": 2,
        "recoverFrom": {"level": "rack", "domain": "r0", "nodes": ["n1", "n2"]},
    }
    op.cache.trainjobs.put(job)
    assert admission.kept_for_jobs(op, policy) == kept


def test_the_store_remembers_only_the_newest_deletions() -> None:
    store = Store(remember=2)
    for n in range(3):
        store.drop(obj(f"o{n}", 1, uid=f"u{n}"))
    assert list(store.gone) == ["u1", "u2"]


def test_the_pod_index_forgets_a_job_whose_last_pod_is_gone() -> None:
    op = Operator()
    first, second = pod("j", 0), pod("j", 1)
    for p in (first, second):
        p["metadata"]["uid"] = p["metadata"]["name"]
        op.cache.put_pod(p)
    assert [x["metadata"]["name"] for x in op.cache.pods_of_job(("ml", "j"))] == ["j-0", "j-1"]
    op.cache.drop_pod(first)
    op.cache.drop_pod(second)
    assert op.cache.pods_of_job(("ml", "j")) == []
    assert ("ml", "j") not in op.cache._by_job


@pytest.mark.parametrize(
    ("patterns", "watched", "not_watched"),
    [
        ([], ["ml", "kube-system"], []),
        (["ml"], ["ml"], ["ml-dev", "other"]),
        (["ml", "team-*"], ["ml", "team-a"], ["other"]),
        (["!*-pr-*"], ["ml", "team-a"], ["app-pr-7"]),
        (["app-*,!*-pr-*,*-pr-123"], ["app-live", "app-pr-123"], ["app-pr-7", "other-pr-123"]),
    ],
)
def test_the_watched_namespaces_are_kopfs_own_patterns(
    monkeypatch: pytest.MonkeyPatch, patterns: list[str], watched: list[str], not_watched: list[str]
) -> None:
    """The cache's cluster-wide first list keeps only the jobs of namespaces kopf watches."""
    monkeypatch.setenv(WATCH_NAMESPACES_ENV, json.dumps(patterns))
    in_scope = watched_from_env()
    assert [n for n in watched if in_scope(n)] == watched
    assert [n for n in not_watched if in_scope(n)] == []
