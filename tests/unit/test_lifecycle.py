"""The life of a job, one decision at a time: observed world in, plan out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from builders import make_job, pod

from phalanx.observe import CreateRejection
from phalanx.plan.trainjob import Plan, World, lost_ranks, plan_trainjob
from phalanx.render.trainjob import JobRef
from phalanx.status import find

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
REF = JobRef("j", "ml", "uid-1")
NODES = frozenset({"n1", "n2", "n3", "n4"})


def stamp(delta: float = 0) -> str:
    return (NOW + timedelta(seconds=delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(
    pods: list[dict[str, Any]],
    status: dict[str, Any] | None = None,
    nodes: int = 2,
    ready: frozenset[str] = NODES,
    verdict: tuple[str, str] | None = None,
    progress: dict[str, Any] | None = None,
    now: datetime = NOW,
    rejection: CreateRejection | None = None,
    **spec: Any,
) -> Plan:
    job = make_job("j", nodes=nodes, **spec).build()
    world = World(pods, ready, verdict, progress, rejection)
    return plan_trainjob(REF, job, 1, status or {}, world, now)


def cond(p: Plan, kind: str) -> tuple[str, str] | None:
    found = find(p.status["conditions"], kind)
    return None if found is None else (found["status"], found["reason"])


def running(gen: int = 1, n: int = 2) -> list[dict[str, Any]]:
    return [pod("j", r, gen, "Running", node=f"n{r + 1}") for r in range(n)]


def test_new_job_creates_gated_pods_and_queues() -> None:
    p = plan([])
    assert [x["metadata"]["name"] for x in p.create] == ["j-0", "j-1"]
    assert all(x["spec"]["schedulingGates"] for x in p.create)
    assert p.status["phase"] == "Queued"
    assert cond(p, "Admitted") == ("False", "Queued")
    assert p.status["gangGeneration"] == 1


def bound_world(
    pods: list[dict[str, Any]] | None = None,
    ready: frozenset[str] = NODES,
    declined: bool = False,
    claim_bound: bool = True,
) -> World:
    return World(pods or [], ready, claim_bound=claim_bound, declined=declined)


def placed(nodes: list[str], generation: int = 1) -> dict[str, Any]:
    return {
        "gangGeneration": generation,
        "placement": {"nodes": nodes, "generation": generation, "level": "rack", "domain": "r1"},
        "admittedAt": stamp(-1),
    }


def test_a_gang_that_can_be_created_bound_waits_for_the_admission_loop_first() -> None:
    job = make_job("j", nodes=2).build()
    p = plan_trainjob(REF, job, 1, {}, bound_world(), NOW)
    assert p.create == []
    assert p.wants_placement
    assert cond(p, "Admitted") == ("False", "Queued")
    assert p.status["queuedAt"] == stamp()


def test_a_placed_gang_is_created_bound_to_its_recorded_nodes_without_the_gate() -> None:
    job = make_job("j", nodes=2).build()
    p = plan_trainjob(REF, job, 1, placed(["n3", "n1"]), bound_world(), NOW)
    assert [x["spec"]["nodeName"] for x in p.create] == ["n3", "n1"]
    assert not any(x["spec"].get("schedulingGates") for x in p.create)
    assert not p.wants_placement
    # Created one by one, the gang is admitted once every rank exists.
    half = [pod("j", 0, 1, "Pending", node="n3")]
    p = plan_trainjob(REF, job, 1, placed(["n3", "n1"]), bound_world(half), NOW)
    assert [x["metadata"]["name"] for x in p.create] == ["j-1"]
    assert cond(p, "Restarting") is None


@pytest.mark.parametrize(
    ("world", "spec"),
    [
        pytest.param(bound_world(declined=True), {}, id="declined-waits-gated-in-the-queue"),
        pytest.param(bound_world(claim_bound=False), {}, id="claim-not-bound-yet"),
        pytest.param(
            bound_world(), {"runPolicy": {"schedulerName": "mine"}}, id="users-own-scheduler"
        ),
        pytest.param(
            bound_world(),
            {"podTemplate": {"spec": {"topologySpreadConstraints": [{"maxSkew": 1}]}}},
            id="topology-spread-is-kube-schedulers",
        ),
        pytest.param(
            bound_world(),
            {"podTemplate": {"spec": {"affinity": {"podAntiAffinity": {"x": 1}}}}},
            id="pod-anti-affinity-is-kube-schedulers",
        ),
    ],
)
def test_otherwise_pods_are_created_gated(world: World, spec: dict[str, Any]) -> None:
    job = make_job("j", nodes=2, **spec).build()
    p = plan_trainjob(REF, job, 1, {}, world, NOW)
    assert [x["metadata"]["name"] for x in p.create] == ["j-0", "j-1"]
    assert all(x["spec"]["schedulingGates"] for x in p.create)
    assert not any(x["spec"].get("nodeName") for x in p.create)


def test_a_gang_placed_on_a_node_lost_before_its_pods_exist_is_placed_again() -> None:
    job = make_job("j", nodes=2).build()
    ready = frozenset({"n1", "n2"})
    p = plan_trainjob(REF, job, 1, placed(["n3", "n1"]), bound_world(ready=ready), NOW)
    assert p.create == []
    assert cond(p, "Admitted") == ("False", "NodeLost")
    assert p.status["avoidedNodes"] == ["n3"]
    assert p.status["gangGeneration"] == 2
    assert p.status["restarts"] == 0


def test_admission_verdict_is_reported() -> None:
    p = plan(
        [pod("j", 0, gated=True), pod("j", 1, gated=True)],
        verdict=("GangExceedsDomainCapacity", "too big"),
    )
    assert cond(p, "Admitted") == ("False", "GangExceedsDomainCapacity")
    assert [e[0] for e in p.events] == ["Warning"]
    assert p.create == []


def test_all_ranks_running() -> None:
    p = plan(running(), status={"gangGeneration": 1, "admittedAt": stamp(-5)})
    assert cond(p, "Admitted") == ("True", "GangAdmitted")
    assert cond(p, "Running") == ("True", "AllRanksRunning")
    assert p.status["phase"] == "Running"
    assert p.status["accelerators"] == 16


def test_rank_failure_restarts_the_whole_gang() -> None:
    pods = [pod("j", 0, 1, "Running", node="n1"), pod("j", 1, 1, "Failed", node="n2", exit_code=1)]
    p = plan(pods, status={"gangGeneration": 1, "restarts": 0})
    assert p.delete == ["j-0", "j-1"]
    assert p.status["restarts"] == 1
    assert p.status["gangGeneration"] == 2
    assert cond(p, "Restarting") == ("True", "RankFailed")
    message = find(p.status["conditions"], "Restarting")["message"]
    assert "rank 1" in message
    assert "exit code 1" in message
    assert p.status["phase"] == "Restarting"


def test_old_generation_must_be_gone_before_new_pods() -> None:
    old = [
        pod("j", 0, 1, "Running", node="n1", terminating=stamp(-1)),
        pod("j", 1, 1, "Failed", node="n2"),
    ]
    p = plan(old, status={"gangGeneration": 2, "restarts": 1})
    assert p.create == []
    assert p.delete == ["j-1"]
    assert p.requeue_after is not None
    p = plan([], status={"gangGeneration": 2, "restarts": 1})
    assert [x["metadata"]["labels"]["phalanx.dev/generation"] for x in p.create] == ["2", "2"]
    assert {
        e["name"]: e["value"] for e in p.create[0]["spec"]["containers"][0]["env"] if "value" in e
    }["PHALANX_RESTART"] == "1"


def test_too_many_failures_fail_the_job() -> None:
    pods = [
        pod("j", 0, 4, "Running", node="n1"),
        pod("j", 1, 4, "Failed", node="n2", exit_code=137),
    ]
    p = plan(pods, status={"gangGeneration": 4, "restarts": 3}, failurePolicy={"maxRestarts": 3})
    assert cond(p, "Failed") == ("True", "RestartLimitExceeded")
    assert p.delete == ["j-0"]
    assert p.status["phase"] == "Failed"


@pytest.mark.parametrize(
    ("rules", "exit_code", "reason", "outcome"),
    [
        ([{"action": "FailJob", "onExitCodes": [2]}], 2, "Error", "Failed"),
        ([{"action": "FailJob", "onExitCodes": [2]}], 1, "Error", "Restarting"),
        ([{"action": "FailJob", "onReasons": ["OOMKilled"]}], 137, "OOMKilled", "Failed"),
        ([{"action": "Ignore", "onExitCodes": [3]}], 3, "Error", "Running"),
    ],
    ids=["permanent-exit-code", "other-code-restarts", "permanent-reason", "ignored"],
)
def test_failure_rules(
    rules: list[dict[str, Any]], exit_code: int, reason: str, outcome: str
) -> None:
    pods = [
        pod("j", 0, 1, "Running", node="n1"),
        pod("j", 1, 1, "Failed", node="n2", exit_code=exit_code, reason=reason),
    ]
    p = plan(
        pods, status={"gangGeneration": 1, "admittedAt": stamp(-1)}, failurePolicy={"rules": rules}
    )
    assert p.status["phase"] == outcome


def test_node_lost_counts_as_rank_failure_and_stuck_pods_are_forced() -> None:
    pods = [pod("j", 0, 1, "Running", node="n1"), pod("j", 1, 1, "Running", node="n2")]
    p = plan(pods, status={"gangGeneration": 1}, ready=frozenset({"n1"}))
    assert cond(p, "Restarting") == ("True", "RankFailed")
    assert "NodeLost" in find(p.status["conditions"], "Restarting")["message"]
    stuck = [pod("j", 1, 1, "Running", node="n2", terminating=stamp(-60))]
    p = plan(stuck, status={"gangGeneration": 2, "restarts": 1}, ready=frozenset({"n1"}))
    assert p.force_delete == ["j-1"]


def test_success_when_every_rank_succeeded_then_ttl() -> None:
    done = [pod("j", r, 1, "Succeeded", node=f"n{r + 1}") for r in range(2)]
    p = plan(done, status={"gangGeneration": 1}, runPolicy={"ttlSecondsAfterFinished": 60})
    assert cond(p, "Succeeded") == ("True", "AllRanksSucceeded")
    assert p.status["completionTime"] == stamp()
    assert p.requeue_after == 60
    assert not p.delete_job
    later = plan(
        done,
        status=p.status,
        now=NOW + timedelta(seconds=61),
        runPolicy={"ttlSecondsAfterFinished": 60},
    )
    assert later.delete_job


def test_suspend_deletes_pods_and_resume_requeues_a_new_generation() -> None:
    p = plan(running(), status={"gangGeneration": 1}, runPolicy={"suspend": True})
    assert p.delete == ["j-0", "j-1"]
    assert cond(p, "Suspended") == ("True", "Suspended")
    assert p.status["phase"] == "Suspended"
    resumed = plan([], status=p.status)
    assert cond(resumed, "Suspended") == ("False", "Resumed")
    assert resumed.status["gangGeneration"] == 2
    assert len(resumed.create) == 2


def test_deadline_exceeded() -> None:
    p = plan(
        running(),
        status={"gangGeneration": 1, "startTime": stamp(-120), "activeSince": stamp(-120)},
        runPolicy={"activeDeadlineSeconds": 100},
    )
    assert cond(p, "Failed") == ("True", "DeadlineExceeded")
    assert p.delete == ["j-0", "j-1"]


def test_the_deadline_clock_starts_at_admission_not_while_queued() -> None:
    deadline = {"activeDeadlineSeconds": 100}
    gated = [pod("j", 0, gated=True), pod("j", 1, gated=True)]
    queued = plan(gated, status={"gangGeneration": 1, "startTime": stamp(-500)}, runPolicy=deadline)
    assert cond(queued, "Failed") is None
    assert "activeSince" not in queued.status

    admitted = plan(
        running(),
        status={"gangGeneration": 1, "startTime": stamp(-500), "admittedAt": stamp(-20)},
        runPolicy=deadline,
    )
    assert cond(admitted, "Failed") is None
    assert admitted.status["activeSince"] == stamp(-20)
    assert admitted.requeue_after is not None
    assert admitted.requeue_after <= 80


def test_suspension_stops_the_deadline_clock_and_a_resume_restarts_it() -> None:
    deadline = {"activeDeadlineSeconds": 100}
    active = {"gangGeneration": 1, "activeSince": stamp(-90), "admittedAt": stamp(-90)}
    suspended = plan(running(), status=active, runPolicy={**deadline, "suspend": True})
    assert "activeSince" not in suspended.status

    resumed = plan([], status=suspended.status, now=NOW + timedelta(hours=1), runPolicy=deadline)
    assert cond(resumed, "Failed") is None
    assert "activeSince" not in resumed.status


def test_gang_timeout_requeues_with_stuck_pod_names() -> None:
    stuck = [pod("j", 0, 1, "Running", node="n1"), pod("j", 1, 1, "Pending")]
    stuck[1]["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "message": "0/4 nodes are available"}
    ]
    p = plan(
        stuck,
        status={"gangGeneration": 1, "admittedAt": stamp(-400)},
        failurePolicy={"gangTimeoutSeconds": 300},
    )
    assert p.delete == ["j-0", "j-1"]
    assert cond(p, "Admitted") == ("False", "GangTimeout")
    assert "j-1 (0/4 nodes are available)" in find(p.status["conditions"], "Admitted")["message"]
    assert p.status["gangGeneration"] == 2
    assert p.status["restarts"] == 0


def test_progress_is_copied_while_running() -> None:
    report = {
        "step": 50,
        "totalSteps": 200,
        "loss": 3.14159,
        "tokensPerSecond": 1234.56,
        "mfu": None,
        "lastCheckpointStep": 40,
        "etaSeconds": 10,
    }
    p = plan(running(), status={"gangGeneration": 1}, progress=report)
    assert p.status["progress"] == {
        "step": 50,
        "totalSteps": 200,
        "percent": "50/200 25%",
        "loss": 3.1416,
        "tokensPerSecond": 1234.6,
        "etaSeconds": 10.0,
        "lastCheckpointStep": 40,
    }


def test_conditions_keep_transition_time_when_status_does_not_flip() -> None:
    first = plan(running(), status={"gangGeneration": 1})
    again = plan(running(), status=first.status, now=NOW + timedelta(seconds=30))
    assert find(again.status["conditions"], "Running") == find(
        first.status["conditions"], "Running"
    )
    assert again.events == []


# --- the termination contract -----------------------------------------------------------


def report(code: int, reason: str, message: str = "", **extra: Any) -> str:
    return json.dumps({"exitCode": code, "reason": reason, "message": message, **extra})


def failed_rank(**fields: Any) -> list[dict[str, Any]]:
    return [pod("j", 0, 1, "Running", node="n1"), pod("j", 1, 1, "Failed", node="n2", **fields)]


@pytest.mark.parametrize(
    ("rules", "ending", "outcome"),
    [
        pytest.param(
            [],
            {"exit_code": 1, "message": report(2, "InvalidConfig", "unknown preset 'nanoo'")},
            ("Failed", "PermanentFailure"),
            id="invalid-config-is-permanent-by-default",
        ),
        pytest.param(
            [],
            {"exit_code": 1, "message": report(3, "DataError", "shard 4 is truncated")},
            ("Failed", "PermanentFailure"),
            id="data-error-is-permanent-by-default",
        ),
        pytest.param(
            [],
            {"exit_code": 1, "message": report(4, "CheckpointError", "step-400 is corrupt")},
            ("Failed", "PermanentFailure"),
            id="checkpoint-error-is-permanent-by-default",
        ),
        pytest.param(
            [],
            {"exit_code": 1, "message": report(11, "CommunicationError", "peer lost")},
            ("Restarting", "RankFailed"),
            id="communication-error-restarts",
        ),
        pytest.param(
            [{"action": "FailJob", "onExitCodes": [10]}],
            {"exit_code": 1, "message": report(10, "OutOfMemory", "CUDA out of memory")},
            ("Failed", "PermanentFailure"),
            id="rule-matches-the-trainers-exit-code-not-torchruns",
        ),
        pytest.param(
            [{"action": "FailJob", "onExitCodes": [1]}],
            {"exit_code": 1, "message": report(11, "CommunicationError")},
            ("Restarting", "RankFailed"),
            id="container-exit-code-ignored-when-the-trainer-classified",
        ),
        pytest.param(
            [{"action": "RestartGang", "onReasons": ["InvalidConfig"]}],
            {"exit_code": 1, "message": report(2, "InvalidConfig")},
            ("Restarting", "RankFailed"),
            id="a-user-rule-overrides-the-default",
        ),
        pytest.param(
            [{"action": "FailJob", "onReasons": ["OOMKilled"]}],
            {"exit_code": 137, "reason": "OOMKilled", "message": report(1, "Error")},
            ("Failed", "PermanentFailure"),
            id="kubelet-reason-still-matches",
        ),
        pytest.param(
            [{"action": "FailJob", "onReasons": ["Evicted"]}],
            {"exit_code": 137, "pod_reason": "Evicted"},
            ("Failed", "PermanentFailure"),
            id="pod-reason-still-matches",
        ),
        pytest.param(
            [{"action": "FailJob", "onExitCodes": [2]}],
            {"exit_code": 2, "message": "Traceback (most recent call last): ..."},
            ("Failed", "PermanentFailure"),
            id="not-the-contract-falls-back-to-the-container-exit-code",
        ),
        pytest.param(
            [],
            {"exit_code": 2, "message": '{"exitCode": "2", "reason": "InvalidConfig"}'},
            ("Restarting", "RankFailed"),
            id="malformed-json-is-not-the-contract",
        ),
    ],
)
def test_failure_rules_read_the_termination_message(
    rules: list[dict[str, Any]], ending: dict[str, Any], outcome: tuple[str, str]
) -> None:
    p = plan(failed_rank(**ending), status={"gangGeneration": 1}, failurePolicy={"rules": rules})
    kind, reason = outcome
    assert cond(p, kind) == ("True", reason)


def test_failed_condition_quotes_the_trainers_message() -> None:
    ending = {"exit_code": 1, "message": report(2, "InvalidConfig", "unknown preset 'nanoo'")}
    p = plan(failed_rank(**ending), status={"gangGeneration": 1})
    assert find(p.status["conditions"], "Failed")["message"] == (
        "rank 1 (pod j-1 on node n2) failed: exit code 2 (InvalidConfig): "
        "\"unknown preset 'nanoo'\"; InvalidConfig is permanent by default: retrying cannot "
        "help, so the job failed."
    )
    assert p.status["restarts"] == 0
    assert p.delete == ["j-0"]


def succeeded(message: str | None = None) -> list[dict[str, Any]]:
    return [
        pod("j", 0, 1, "Succeeded", node="n1", exit_code=0, reason="Completed", message=message),
        pod("j", 1, 1, "Succeeded", node="n2", exit_code=0, reason="Completed"),
    ]


def test_success_takes_the_export_from_rank_zeros_message() -> None:
    message = report(0, "Completed", "done", exportPath="export", exportSteps=[200, 100])
    p = plan(succeeded(message), status={"gangGeneration": 1, "exportSteps": [100]})
    assert cond(p, "Succeeded") == ("True", "AllRanksSucceeded")
    assert (p.status["exportPath"], p.status["exportSteps"]) == ("export", [100, 200])


def test_success_takes_the_final_progress_from_rank_zeros_message() -> None:
    final = {"step": 200, "totalSteps": 200, "loss": 3.25, "lastCheckpointStep": 200}
    message = report(0, "Completed", "done", progress=final)
    stale = {"step": 190, "totalSteps": 200, "percent": "190/200 95%", "loss": 3.3}
    p = plan(succeeded(message), status={"gangGeneration": 1, "progress": stale})
    assert p.status["progress"] == {
        "step": 200,
        "totalSteps": 200,
        "percent": "200/200 100%",
        "loss": 3.25,
        "lastCheckpointStep": 200,
    }


@pytest.mark.parametrize(
    "message",
    [None, "all good", report(0, "Completed", exportPath="../../etc")],
    ids=["no-message", "not-the-contract", "path-outside-the-volume"],
)
def test_success_without_a_reported_export_sets_no_export_path(message: str | None) -> None:
    p = plan(succeeded(message), status={"gangGeneration": 1})
    assert cond(p, "Succeeded") == ("True", "AllRanksSucceeded")
    assert "exportPath" not in p.status


def test_exports_in_progress_are_copied_while_running() -> None:
    progress = {"step": 300, "totalSteps": 1000, "exportSteps": [200, 100, "x", True]}
    p = plan(running(), status={"gangGeneration": 1}, progress=progress)
    assert p.status["exportSteps"] == [100, 200]
    assert "exportPath" not in p.status
    done = {**progress, "exportPath": "export"}
    assert plan(running(), status=p.status, progress=done).status["exportPath"] == "export"


# --- containers that cannot start -------------------------------------------------------


def pulling(reason: str = "ImagePullBackOff", gen: int = 1) -> list[dict[str, Any]]:
    return [
        pod("j", 0, gen, "Running", node="n1", image="ghcr.io/x/trainer:typo"),
        pod(
            "j", 1, gen, "Pending", node="n2", image="ghcr.io/x/trainer:typo",
            waiting=(reason, 'Back-off pulling image "ghcr.io/x/trainer:typo"'),
        ),
    ]  # fmt: skip


def test_image_pull_failure_is_a_condition_naming_the_image_and_the_pod() -> None:
    p = plan(pulling(), status={"gangGeneration": 1, "admittedAt": stamp(-10)})
    assert cond(p, "Running") == ("False", "ImagePullFailed")
    message = find(p.status["conditions"], "Running")["message"]
    assert "pod j-1" in message
    assert "'ghcr.io/x/trainer:typo'" in message
    assert "ImagePullBackOff" in message
    assert ("Warning", "ImagePullFailed", message) in p.events
    assert p.delete == []
    assert p.requeue_after == 290


def test_image_pull_failure_at_the_gang_timeout_is_a_counted_restart() -> None:
    p = plan(pulling(), status={"gangGeneration": 1, "admittedAt": stamp(-301), "restarts": 0})
    assert cond(p, "Restarting") == ("True", "RankFailed")
    assert "ImagePullBackOff" in find(p.status["conditions"], "Restarting")["message"]
    assert (p.status["restarts"], p.status["gangGeneration"]) == (1, 2)
    assert p.delete == ["j-0", "j-1"]
    limited = plan(
        pulling(gen=4),
        status={"gangGeneration": 4, "admittedAt": stamp(-301), "restarts": 3},
        failurePolicy={"maxRestarts": 3},
    )
    assert cond(limited, "Failed") == ("True", "RestartLimitExceeded")


def test_a_rule_can_fail_the_job_on_an_image_pull_failure() -> None:
    p = plan(
        pulling(),
        status={"gangGeneration": 1, "admittedAt": stamp(-301)},
        failurePolicy={"rules": [{"action": "FailJob", "onReasons": ["ImagePullFailed"]}]},
    )
    assert cond(p, "Failed") == ("True", "PermanentFailure")


def test_an_invalid_image_name_fails_the_job_at_once() -> None:
    p = plan(pulling("InvalidImageName"), status={"gangGeneration": 1, "admittedAt": stamp(-1)})
    assert cond(p, "Failed") == ("True", "PermanentFailure")
    assert "InvalidImageName" in find(p.status["conditions"], "Failed")["message"]


def test_missing_config_map_is_a_container_config_error() -> None:
    pods = [
        pod("j", 0, 1, "Running", node="n1"),
        pod("j", 1, 1, "Pending", node="n2", waiting=("CreateContainerConfigError", 'configmap "x" not found')),
    ]  # fmt: skip
    p = plan(pods, status={"gangGeneration": 1, "admittedAt": stamp(-10)})
    assert cond(p, "Running") == ("False", "ContainerConfigError")
    assert 'configmap "x" not found' in find(p.status["conditions"], "Running")["message"]


# --- pods the API server refuses --------------------------------------------------------


def rejection(attempts: int = 1, at: float = 0, generation: int = 1) -> CreateRejection:
    return CreateRejection(
        object="Pod j-0",
        code=422,
        message='Pod "j-0" is invalid: spec.dnsPolicy: Unsupported value: "Bogus"',
        attempts=attempts,
        at=NOW + timedelta(seconds=at),
        generation=generation,
    )


def test_a_rejected_pod_is_reported_and_retried_with_backoff() -> None:
    p = plan([], status={"gangGeneration": 1}, rejection=rejection(attempts=2, at=-5))
    assert p.create == []
    assert cond(p, "Admitted") == ("False", "PodCreateRejected")
    message = find(p.status["conditions"], "Admitted")["message"]
    assert "Unsupported value" in message
    assert "HTTP 422" in message
    assert p.requeue_after == 15  # the second attempt waits 20 s
    again = plan([], status=p.status, now=NOW + timedelta(seconds=3), rejection=rejection(2, -5))
    assert again.status == p.status, "a held rejection must not rewrite status every pass"


@pytest.mark.parametrize(
    ("reject", "now"),
    [(rejection(attempts=1, at=-11), NOW), (rejection(generation=0), NOW)],
    ids=["backoff-over", "spec-changed"],
)
def test_creation_is_tried_again(reject: CreateRejection, now: datetime) -> None:
    assert len(plan([], status={"gangGeneration": 1}, rejection=reject, now=now).create) == 2


def test_backoff_doubles_up_to_five_minutes() -> None:
    assert [rejection(n).backoff().total_seconds() for n in (1, 2, 3, 4, 5, 6, 9)] == [
        10, 20, 40, 80, 160, 300, 300
    ]  # fmt: skip


def test_validation_loss_reaches_the_status() -> None:
    from phalanx.status import progress_status

    progress = progress_status(
        {"step": 20, "totalSteps": 40, "valLoss": 6.54321, "valPerplexity": 692.3456}
    )
    assert (progress["valLoss"], progress["valPerplexity"]) == (6.5432, 692.3456)


@pytest.mark.parametrize(
    ("pods", "generation", "lost"),
    [
        pytest.param([pod("j", 0, 1, "Running", node="n1")], 1, [1], id="admitted-rank-gone"),
        pytest.param([pod("j", 0, 1, gated=True)], 1, [], id="still-gated-is-not-lost"),
        pytest.param(
            [pod("j", 0, 2, "Running", node="n1"), pod("j", 1, 1, "Running", node="n2")],
            2,
            [],
            id="old-gang-still-leaving",
        ),
        pytest.param(running(), 1, [], id="complete"),
    ],
)
def test_lost_ranks_are_ranks_gone_from_an_admitted_gang(
    pods: list[dict[str, Any]], generation: int, lost: list[int]
) -> None:
    assert lost_ranks(2, generation, pods, admitted=True) == lost


def test_a_rank_not_yet_created_before_admission_is_not_lost() -> None:
    # Pods created bound appear one by one; until the gang was admitted whole, a missing rank
    # is one still to be created, not one that vanished.
    pods = [pod("j", 0, 1, "Running", node="n1")]
    assert lost_ranks(2, 1, pods, admitted=False) == []
    assert lost_ranks(2, 1, pods, admitted=True) == [1]


def unbound_claim_pods(gen: int = 1) -> list[dict[str, Any]]:
    pods = [pod("j", 0, gen, "Running", node="n1"), pod("j", 1, gen, "Pending")]
    pods[1]["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": '0/4 nodes are available: persistentvolumeclaim "shards" not found.',
        }
    ]
    return pods


def test_a_pod_whose_claim_is_missing_is_named_with_the_cause_while_waiting() -> None:
    p = plan(unbound_claim_pods(), status={"gangGeneration": 1, "admittedAt": stamp(-20)})

    assert cond(p, "Running") == ("False", "ClaimNotBound")
    message = find(p.status["conditions"], "Running")["message"]
    assert "pod j-1" in message
    assert 'persistentvolumeclaim "shards" not found' in message
    assert p.delete == []


def test_a_missing_claim_at_the_gang_timeout_is_a_counted_restart_not_a_free_requeue() -> None:
    p = plan(
        unbound_claim_pods(),
        status={"gangGeneration": 1, "admittedAt": stamp(-400), "restarts": 0},
        failurePolicy={"gangTimeoutSeconds": 300, "maxRestarts": 2},
    )

    assert p.status["restarts"] == 1
    assert cond(p, "Restarting") is not None
    assert "ClaimNotBound" in find(p.status["conditions"], "Restarting")["message"]
    exhausted = plan(
        unbound_claim_pods(3),
        status={"gangGeneration": 3, "admittedAt": stamp(-400), "restarts": 2},
        failurePolicy={"gangTimeoutSeconds": 300, "maxRestarts": 2},
    )
    # The restarts are spent: the job fails, naming the claim.
    assert cond(exhausted, "Failed") is not None
    assert "ClaimNotBound" in find(exhausted.status["conditions"], "Failed")["message"]


def test_a_pod_the_kubelet_refused_names_the_kubelets_message() -> None:
    refused = pod("j", 1, 1, "Failed", node="n2")
    refused["status"]["reason"] = "OutOfnvidia.com/gpu"
    refused["status"]["message"] = (
        "Pod was rejected: Node didn't have enough resource: nvidia.com/gpu"
    )
    p = plan([pod("j", 0, 1, "Running", node="n1"), refused], status={"gangGeneration": 1})

    restarting = find(p.status["conditions"], "Restarting")
    assert restarting is not None
    assert "j-1" in restarting["message"]
    assert "OutOfnvidia.com/gpu" in restarting["message"]
    assert "enough resource" in restarting["message"]


def test_a_node_lost_under_a_rank_is_avoided_by_the_next_gang() -> None:
    p = plan(running(), status={"gangGeneration": 1}, ready=frozenset({"n1"}))
    assert cond(p, "Restarting") == ("True", "RankFailed")
    assert p.status["avoidedNodes"] == ["n2"]


def test_a_workload_failure_does_not_blame_the_node() -> None:
    failed = [
        pod("j", 0, 1, "Running", node="n1"),
        pod("j", 1, 1, "Failed", node="n2", exit_code=1),
    ]
    p = plan(failed, status={"gangGeneration": 1})
    assert cond(p, "Restarting") == ("True", "RankFailed")
    assert "avoidedNodes" not in p.status


def test_an_evicted_rank_blames_its_node() -> None:
    evicted = pod("j", 1, 1, "Failed", node="n2", pod_reason="Evicted")
    p = plan([pod("j", 0, 1, "Running", node="n1"), evicted], status={"gangGeneration": 1})
    assert p.status["avoidedNodes"] == ["n2"]


def timed_out(timeouts: int) -> Plan:
    stuck = [pod("j", 0, 1, "Running", node="n1"), pod("j", 1, 1, "Pending")]
    status = {
        "gangGeneration": 1,
        "admittedAt": stamp(-400),
        "placement": {"level": "rack", "domain": "r1", "nodes": ["n1", "n3"], "generation": 1},
        "gangTimeouts": timeouts,
    }
    return plan(stuck, status=status, failurePolicy={"gangTimeoutSeconds": 300})


def test_a_gang_timeout_avoids_the_node_the_stuck_pod_was_placed_on() -> None:
    p = timed_out(0)
    assert cond(p, "Admitted") == ("False", "GangTimeout")
    assert p.status["gangTimeouts"] == 1
    assert p.status["avoidedNodes"] == ["n3"]
    assert "gang timeout 1 of 3 in a row" in find(p.status["conditions"], "Admitted")["message"]


def test_repeated_gang_timeouts_fail_the_job_with_a_clear_reason() -> None:
    p = timed_out(2)
    assert cond(p, "Failed") == ("True", "GangTimeoutLimitExceeded")
    assert "3 times in a row" in find(p.status["conditions"], "Failed")["message"]
    assert p.status["gangGeneration"] == 1


def test_a_running_gang_forgets_its_gang_timeouts() -> None:
    p = plan(running(gen=2), status={"gangGeneration": 2, "gangTimeouts": 2})
    assert cond(p, "Running") == ("True", "AllRanksRunning")
    assert "gangTimeouts" not in p.status
