"""Gangs handed to another scheduler (Kueue, Volcano, coscheduling, plain kube-scheduler): what
their pods carry, and when the job counts them as admitted."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from builders import make_job, pod

from phalanx.placement import Topology
from phalanx.plan.trainjob import Plan, World, plan_trainjob
from phalanx.render.trainjob import JobRef
from phalanx.status import find

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
REF = JobRef("j", "ml", "uid-1")
GENERIC = Topology.parse("generic")


def plan(pods: list[dict[str, Any]], levels: Topology = GENERIC, **spec: Any) -> Plan:
    job = make_job("j", nodes=2, accelerator={"type": "nvidia", "perNode": 8}, **spec).build()
    world = World(pods, frozenset({"n1", "n2"}), topology=levels)
    return plan_trainjob(REF, job, 1, {"gangGeneration": 1}, world, NOW)


def admitted(p: Plan) -> tuple[str, str]:
    found = find(p.status["conditions"], "Admitted")
    assert found is not None
    return found["status"], found["reason"]


def test_kueue_pods_form_one_pod_group_per_gang_generation() -> None:
    p = plan([], runPolicy={"gangScheduler": "kueue", "queueName": "team-a"})
    assert [(x["metadata"]["labels"], x["metadata"].get("annotations")) for x in p.create] == [
        (
            {
                **x["metadata"]["labels"],
                "kueue.x-k8s.io/pod-group-name": "j-1",
                "kueue.x-k8s.io/queue-name": "team-a",
            },
            # A group whose pods all ended is finished: each gang generation is a new group.
            {
                "kueue.x-k8s.io/pod-group-total-count": "2",
                "kueue.x-k8s.io/retriable-in-group": "false",
            },
        )
        for x in p.create
    ]
    assert all(not x["spec"].get("schedulingGates") for x in p.create)


@pytest.mark.parametrize(
    ("topology", "annotation", "label"),
    [
        pytest.param(
            {"required": "rack"},
            "kueue.x-k8s.io/podset-required-topology",
            "phalanx.dev/rack",
            id="required",
        ),
        pytest.param(
            {"preferred": "block"},
            "kueue.x-k8s.io/podset-preferred-topology",
            "phalanx.dev/block",
            id="preferred",
        ),
    ],
)
def test_kueue_gets_spec_topology_as_its_topology_annotation(
    topology: dict[str, str], annotation: str, label: str
) -> None:
    p = plan([], runPolicy={"gangScheduler": "kueue"}, topology=topology)
    assert [x["metadata"]["annotations"][annotation] for x in p.create] == [label, label]


def test_kueue_with_a_level_the_topology_lacks_creates_nothing_and_says_so() -> None:
    p = plan([], runPolicy={"gangScheduler": "kueue"}, topology={"required": "clique"})
    assert p.create == []
    assert admitted(p) == ("False", "UnknownTopologyLevel")


def kueue_gated(rank: int) -> dict[str, Any]:
    waiting = pod("j", rank, 1, "Pending")
    waiting["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    return waiting


@pytest.mark.parametrize(
    ("scheduler", "pods", "expected", "gpus"),
    [
        pytest.param("kueue", [kueue_gated(0), kueue_gated(1)], "False", 0, id="kueue-gated"),
        pytest.param(
            "kueue", [pod("j", 0, 1, "Pending"), pod("j", 1, 1, "Pending")], "True", 16,
            id="kueue-admitted",
        ),
        pytest.param(
            "none", [pod("j", 0, 1, "Pending", node="n1"), pod("j", 1, 1, "Pending")], "False", 0,
            id="none-half-bound",
        ),
        pytest.param(
            "volcano",
            [pod("j", 0, 1, "Pending", node="n1"), pod("j", 1, 1, "Pending", node="n2")],
            "True",
            16,
            id="volcano-bound",
        ),
    ],
)  # fmt: skip
def test_other_schedulers_count_as_admitted_only_once_they_took_the_gang(
    scheduler: str, pods: list[dict[str, Any]], expected: str, gpus: int
) -> None:
    p = plan(pods, runPolicy={"gangScheduler": scheduler})
    assert admitted(p)[0] == expected
    assert p.status.get("accelerators", 0) == gpus
