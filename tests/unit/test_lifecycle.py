"""The life of a job, one decision at a time: observed world in, plan out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from builders import make_job, pod

from phalanx.lifecycle import Plan, World, plan_trainjob
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
    **spec: Any,
) -> Plan:
    job = make_job("j", nodes=nodes, **spec).build()
    return plan_trainjob(REF, job, 1, status or {}, World(pods, ready, verdict, progress), now)


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
        status={"gangGeneration": 1, "startTime": stamp(-120)},
        runPolicy={"activeDeadlineSeconds": 100},
    )
    assert cond(p, "Failed") == ("True", "DeadlineExceeded")
    assert p.delete == ["j-0", "j-1"]


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
