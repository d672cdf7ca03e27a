"""Pinning a placed pod to its node: by the node's name, whatever its hostname label says."""

from __future__ import annotations

from typing import Any

import pytest

from phalanx.constants import GANG_GATE
from phalanx.placement import CapacitySnapshot
from phalanx.render.overlay import merge
from phalanx.render.pod import pin_patch

PIN = {"key": "metadata.name", "operator": "In", "values": ["node-a"]}
RACK_TERM = {"matchExpressions": [{"key": "rack", "operator": "In", "values": ["r1"]}]}
ZONE_TERM = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]}


def gated_pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ml"},
        "spec": {
            "schedulingGates": [{"name": GANG_GATE}],
            "containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}],
            **spec,
        },
    }


def required_terms(spec: dict[str, Any]) -> list[dict[str, Any]]:
    node = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms: list[dict[str, Any]] = node["nodeSelectorTerms"]
    return terms


@pytest.mark.parametrize(
    ("affinity", "expected"),
    [
        pytest.param(None, [{"matchFields": [PIN]}], id="no-affinity"),
        pytest.param(
            {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [RACK_TERM, ZONE_TERM]}}},
            [{**RACK_TERM, "matchFields": [PIN]}, {**ZONE_TERM, "matchFields": [PIN]}],
            id="every-user-term-narrowed",
        ),
        pytest.param(
            {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{**RACK_TERM, "matchFields": [PIN]}]}}},
            [{**RACK_TERM, "matchFields": [PIN]}],
            id="already-pinned",
        ),
    ],
)  # fmt: skip
def test_pin_is_a_node_name_match_fields_term(
    affinity: dict[str, Any] | None, expected: list[dict[str, Any]]
) -> None:
    pod = gated_pod(**({"affinity": affinity} if affinity else {}))

    patched = merge(pod["spec"], pin_patch(pod, "node-a")["spec"])

    assert required_terms(patched) == expected
    assert patched["schedulingGates"] is None
    assert "nodeSelector" not in patched


def test_pin_keeps_other_gates_and_pod_affinity() -> None:
    pod = gated_pod(
        affinity={"podAntiAffinity": {"x": 1}},
        schedulingGates=[{"name": GANG_GATE}, {"name": "example.com/quota"}],
    )

    patch = pin_patch(pod, "node-a")["spec"]

    assert patch["schedulingGates"] == [{"name": "example.com/quota"}]
    assert patch["affinity"]["podAntiAffinity"] == {"x": 1}


def test_a_pinned_pod_reserves_its_node_even_when_hostname_differs() -> None:
    node = {
        "metadata": {"name": "node-a", "labels": {"kubernetes.io/hostname": "ip-10-0-0-1"}},
        "status": {
            "allocatable": {"cpu": "4", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    pod = gated_pod(affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [RACK_TERM, ZONE_TERM]}}})  # fmt: skip
    pod["spec"] = merge(pod["spec"], pin_patch(pod, "node-a")["spec"])
    pod["spec"].pop("schedulingGates")

    snapshot = CapacitySnapshot.from_objects([node], [pod])

    [info] = snapshot.nodes
    assert info.free["cpu"] == 3000
