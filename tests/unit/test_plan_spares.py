"""The planner's side of hot spares: a restart remembers where the gang ran, several lost nodes
make one restart, and a preempted filler is queued again without a restart counted."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from builders import make_job, pod

from phalanx.plan.trainjob import Plan, World, plan_trainjob
from phalanx.render.trainjob import JobRef
from phalanx.status import find

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
REF = JobRef("j", "ml", "uid-1")
PLACED = {"level": "rack", "domain": "r0", "nodes": ["n1", "n2", "n3"], "generation": 1}


def plan(
    pods: list[dict[str, Any]],
    status: dict[str, Any],
    ready: frozenset[str],
    nodes: int = 3,
    **spec: Any,
) -> Plan:
    job = make_job("j", nodes=nodes, failurePolicy={"nodeLostGraceSeconds": 0}, **spec).build()
    return plan_trainjob(REF, job, 1, status, World(pods, ready), NOW)


def running(generation: int = 1) -> list[dict[str, Any]]:
    return [pod("j", r, generation, "Running", node=f"n{r + 1}") for r in range(3)]


def condition(p: Plan, kind: str) -> dict[str, Any]:
    found = find(p.status["conditions"], kind)
    assert found is not None
    return dict(found)


def test_a_restart_remembers_where_the_gang_ran() -> None:
    status = {"gangGeneration": 1, "placement": PLACED}
    p = plan(running(), status, frozenset({"n1", "n3", "n4"}))
    assert p.status["restarts"] == 1
    assert p.status["recoverFrom"] == PLACED
    assert "placement" not in p.status


def test_nodes_lost_together_are_one_restart_naming_every_node() -> None:
    status = {"gangGeneration": 1, "placement": PLACED}
    p = plan(running(), status, frozenset({"n3", "n4"}))
    assert p.status["restarts"] == 1
    assert p.status["gangGeneration"] == 2
    assert p.status["avoidedNodes"] == ["n1", "n2"]
    message = condition(p, "Restarting")["message"]
    assert message.startswith("2 nodes lost together (n1, n2; ranks 0, 1)")


def test_a_node_of_the_old_gang_lost_after_the_restart_is_avoided_too() -> None:
    # The restart saw n1 lost; n2 went NotReady while the old gang was being deleted.
    status = {"gangGeneration": 2, "restarts": 1, "avoidedNodes": ["n1"]}
    old = [pod("j", 1, 1, "Running", node="n2", terminating="2026-01-01T11:59:59Z")]
    p = plan(old, status, frozenset({"n3", "n4"}))
    assert p.status["avoidedNodes"] == ["n1", "n2"]
    assert p.status["restarts"] == 1  # no second restart


def test_a_preempted_filler_is_queued_again_without_a_restart() -> None:
    status = {
        "gangGeneration": 1,
        "restarts": 0,
        "placement": PLACED,
        "preemption": {"by": "ml/big", "nodes": ["n3"], "generation": 1},
    }
    deleting = [
        pod("j", r, 1, "Running", node=f"n{r + 1}", terminating="2026-01-01T11:59:59Z")
        for r in range(2)
    ] + [pod("j", 2, 1, "Running", node="n3")]
    p = plan(deleting, status, frozenset({"n1", "n2", "n3"}), runPolicy={"preemptible": True})
    assert p.status["restarts"] == 0
    assert p.status["gangGeneration"] == 2
    assert p.delete == ["j-2"]
    admitted = condition(p, "Admitted")
    assert admitted["reason"] == "Preempted"
    assert "for the recovery of ml/big" in admitted["message"]
    assert p.events[0][1] == "Preempted"


def test_the_preemption_of_an_earlier_gang_changes_nothing() -> None:
    status = {
        "gangGeneration": 2,
        "placement": {**PLACED, "generation": 2},
        "admittedAt": "2026-01-01T11:00:00Z",
        "preemption": {"by": "ml/big", "nodes": ["n3"], "generation": 1},
    }
    p = plan(running(2), status, frozenset({"n1", "n2", "n3"}))
    assert condition(p, "Running")["status"] == "True"
    assert p.status["gangGeneration"] == 2


def test_pods_of_a_preemptible_job_carry_the_label() -> None:
    p = plan([], {}, frozenset(), nodes=2, runPolicy={"preemptible": True})
    assert [x["metadata"]["labels"].get("phalanx.dev/preemptible") for x in p.create] == [
        "true",
        "true",
    ]
    ordinary = plan([], {}, frozenset(), nodes=2)
    assert all("phalanx.dev/preemptible" not in x["metadata"]["labels"] for x in ordinary.create)


def test_a_gang_placed_on_a_node_lost_before_binding_is_placed_again_without_a_restart() -> None:
    # The restart saw n1 lost; n2 failed after the new gang was placed on it, before binding.
    status = {
        "gangGeneration": 2,
        "restarts": 1,
        "avoidedNodes": ["n1"],
        "placement": {
            "level": "rack",
            "domain": "r0",
            "nodes": ["n2", "n3", "n4"],
            "generation": 2,
        },
        "admittedAt": "2026-01-01T11:59:59Z",
    }
    pods = [
        pod("j", 0, 2, "Pending"),
        pod("j", 1, 2, "Running", node="n3"),
        pod("j", 2, 2, "Running", node="n4"),
    ]
    p = plan(pods, status, frozenset({"n3", "n4"}))
    assert p.status["restarts"] == 1
    assert p.status["gangGeneration"] == 3
    assert p.status["avoidedNodes"] == ["n1", "n2"]
    assert p.delete == ["j-0", "j-1", "j-2"]
    admitted = condition(p, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "NodeLost")
    assert "Placed on n2, lost before the pods were bound" in admitted["message"]
