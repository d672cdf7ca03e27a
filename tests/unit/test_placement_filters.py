"""Placement applies kube-scheduler's node filters: tables of the semantics, then properties on
random clusters checked against an oracle written straight from the Kubernetes docs on raw
Node and Pod dicts."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phalanx.constants import Reason
from phalanx.placement import (
    PRESETS,
    CapacitySnapshot,
    GangRequest,
    Placement,
    Unplaceable,
    admit,
    place_gang,
)
from phalanx.placement.filters import PodConstraints, Taint
from phalanx.placement.snapshot import pod_requests

GPU = "nvidia.com/gpu"
PRODUCT = "nvidia.com/gpu.product"
GENERIC = PRESETS["generic"]


def node(
    name: str,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    unschedulable: bool = False,
    gpus: int = 8,
    pods: int = 110,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, **(labels or {})},
        },
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {
            "allocatable": {"cpu": "64", "memory": "512Gi", GPU: str(gpus), "pods": str(pods)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def pod(
    selector: dict[str, str] | None = None,
    terms: list[dict[str, Any]] | None = None,
    tolerations: list[dict[str, str]] | None = None,
    gpus: int = 8,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{"name": "c", "resources": {"limits": {GPU: str(gpus)}}}],
        "tolerations": tolerations or [],
    }
    if selector is not None:
        spec["nodeSelector"] = selector
    if terms is not None:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
            }
        }
    return {"metadata": {"name": "p"}, "spec": spec}


def refusal(pod_dict: dict[str, Any], node_dict: dict[str, Any]) -> str | None:
    snapshot = CapacitySnapshot.from_objects([node_dict])
    return snapshot.nodes[0].refusal(PodConstraints.from_pod(pod_dict))


def expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": operator, "values": list(values)}


FILTERS = [
    pytest.param(pod(), node("n"), True, id="no-constraints"),
    pytest.param(pod({PRODUCT: "H100"}), node("n", {PRODUCT: "H100"}), True, id="selector-match"),
    pytest.param(pod({PRODUCT: "H100"}), node("n", {PRODUCT: "A100"}), False, id="selector-miss"),
    pytest.param(pod({PRODUCT: "H100"}), node("n"), False, id="selector-key-absent"),
    pytest.param(
        pod(terms=[{"matchExpressions": [expr("zone", "In", "a", "b")]}]),
        node("n", {"zone": "b"}),
        True,
        id="affinity-in",
    ),
    pytest.param(
        pod(terms=[{"matchExpressions": [expr("zone", "NotIn", "a")]}]),
        node("n"),
        True,
        id="affinity-notin-matches-absent-key",
    ),
    pytest.param(
        pod(terms=[{"matchExpressions": [expr("zone", "DoesNotExist")]}]),
        node("n", {"zone": "a"}),
        False,
        id="affinity-does-not-exist",
    ),
    pytest.param(
        pod(terms=[{"matchExpressions": [expr("gpus", "Gt", "4")]}]),
        node("n", {"gpus": "8"}),
        True,
        id="affinity-gt",
    ),
    pytest.param(
        pod(terms=[{"matchExpressions": [expr("gpus", "Lt", "4")]}]),
        node("n", {"gpus": "eight"}),
        False,
        id="affinity-lt-non-integer",
    ),
    pytest.param(
        pod(
            terms=[
                {"matchExpressions": [expr("zone", "In", "x")]},
                {"matchExpressions": [expr("zone", "In", "a")]},
            ]
        ),
        node("n", {"zone": "a"}),
        True,
        id="affinity-terms-are-ored",
    ),
    pytest.param(
        pod(terms=[{"matchExpressions": [expr("zone", "In", "a"), expr("rack", "Exists")]}]),
        node("n", {"zone": "a"}),
        False,
        id="affinity-expressions-are-anded",
    ),
    pytest.param(pod(terms=[{}]), node("n"), False, id="affinity-empty-term-matches-nothing"),
    pytest.param(
        pod(terms=[{"matchFields": [expr("metadata.name", "In", "n")]}]),
        node("n"),
        True,
        id="affinity-match-fields-name",
    ),
    pytest.param(
        pod(terms=[{"matchFields": [expr("metadata.name", "NotIn", "n")]}]),
        node("n"),
        False,
        id="affinity-match-fields-not-in",
    ),
    pytest.param(
        pod(), node("n", taints=[{"key": "rack", "effect": "NoSchedule"}]), False, id="taint"
    ),
    pytest.param(
        pod(), node("n", taints=[{"key": "rack", "effect": "NoExecute"}]), False, id="noexecute"
    ),
    pytest.param(
        pod(),
        node("n", taints=[{"key": "rack", "effect": "PreferNoSchedule"}]),
        True,
        id="prefer-no-schedule-is-soft",
    ),
    pytest.param(
        pod(tolerations=[{"key": "rack", "operator": "Exists"}]),
        node("n", taints=[{"key": "rack", "value": "x", "effect": "NoSchedule"}]),
        True,
        id="toleration-exists-any-effect",
    ),
    pytest.param(
        pod(tolerations=[{"key": "rack", "value": "y", "effect": "NoSchedule"}]),
        node("n", taints=[{"key": "rack", "value": "x", "effect": "NoSchedule"}]),
        False,
        id="toleration-equal-other-value",
    ),
    pytest.param(
        pod(tolerations=[{"key": "rack", "operator": "Exists", "effect": "NoExecute"}]),
        node("n", taints=[{"key": "rack", "effect": "NoSchedule"}]),
        False,
        id="toleration-other-effect",
    ),
    pytest.param(
        pod(tolerations=[{"operator": "Exists"}]),
        node(
            "n", taints=[{"key": "a", "effect": "NoSchedule"}, {"key": "b", "effect": "NoExecute"}]
        ),
        True,
        id="toleration-wildcard",
    ),
    pytest.param(pod(), node("n", unschedulable=True), False, id="cordoned"),
    pytest.param(
        pod(tolerations=[{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}]),
        node("n", unschedulable=True),
        True,
        id="cordon-tolerated",
    ),
]


@pytest.mark.parametrize(("pod_dict", "node_dict", "allowed"), FILTERS)
def test_filter(pod_dict: dict[str, Any], node_dict: dict[str, Any], allowed: bool) -> None:
    assert (refusal(pod_dict, node_dict) is None) is allowed


def gang_of(pod_dict: dict[str, Any], pods: int, key: str = "g") -> GangRequest:
    return GangRequest(
        key,
        pods,
        pod_requests(pod_dict),
        constraints=PodConstraints.from_pod(pod_dict),
    )


def test_product_selector_places_on_matching_nodes_only() -> None:
    nodes = [node(f"a{i}", {PRODUCT: "A100"}) for i in range(4)] + [
        node(f"h{i}", {PRODUCT: "H100"}) for i in range(4)
    ]
    result = place_gang(
        CapacitySnapshot.from_objects(nodes), gang_of(pod({PRODUCT: "H100"}), 4), GENERIC
    )
    assert isinstance(result, Placement)
    assert set(result.nodes) == {"h0", "h1", "h2", "h3"}


def test_no_matching_node_is_permanent_and_says_why() -> None:
    nodes = [
        node("a0", {PRODUCT: "A100"}),
        node("t0", taints=[{"key": "maint", "effect": "NoSchedule"}]),
    ]
    request = gang_of(pod({PRODUCT: "H100"}), 1)
    result = place_gang(
        CapacitySnapshot.from_objects(nodes),
        request,
        GENERIC,
        CapacitySnapshot.from_objects(nodes, capacity=True),
    )
    assert result == Unplaceable(
        Reason.NO_MATCHING_NODES,
        "needs 1 pod of 8 nvidia.com/gpu, but kube-scheduler would refuse the pods every node: "
        "2 nodes: nodeSelector nvidia.com/gpu.product=H100 does not match; fix "
        "spec.accelerator.product or the nodeSelector, affinity or tolerations of "
        "spec.podTemplate, or label or untaint the nodes",
        permanent=True,
    )


def test_not_ready_nodes_are_capacity_not_a_never_fits_verdict() -> None:
    # Right after a cluster starts, every node still carries the not-ready taint.
    taint = [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]
    nodes = [node(f"n{i}", taints=taint) for i in range(2)]
    result = place_gang(
        CapacitySnapshot.from_objects(nodes),
        gang_of(pod(), 2),
        GENERIC,
        CapacitySnapshot.from_objects(nodes, capacity=True),
    )
    assert isinstance(result, Unplaceable)
    assert not result.permanent, result
    assert result.reason == Reason.INSUFFICIENT_CAPACITY
    assert "node.kubernetes.io/not-ready" in result.message


def test_pod_count_limit_is_a_resource() -> None:
    nodes = [node("small", pods=1), node("big", pods=3)]
    result = place_gang(CapacitySnapshot.from_objects(nodes), gang_of(pod(gpus=1), 3), GENERIC)
    assert isinstance(result, Placement)
    assert result.nodes == ("big",) * 3


# --- properties against an oracle ------------------------------------------------------------


def oracle_accepts(pod_dict: dict[str, Any], node_dict: dict[str, Any]) -> bool:
    """kube-scheduler's default filters (bar resources), straight from the Kubernetes docs."""
    spec, node_spec = pod_dict["spec"], node_dict["spec"]
    labels = node_dict["metadata"]["labels"]
    tolerations = spec.get("tolerations") or []

    def tolerated(taint: dict[str, str]) -> bool:
        for t in tolerations:
            if t.get("effect") and t["effect"] != taint["effect"]:
                continue
            if t.get("key") and t["key"] != taint["key"]:
                continue
            if t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", ""):
                return True
        return False

    if node_spec.get("unschedulable") and not tolerated(
        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    ):
        return False
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    affinity = spec.get("affinity")
    if affinity:
        terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]

        def holds(r: dict[str, Any]) -> bool:
            op, key, values = r["operator"], r["key"], r.get("values") or []
            if op == "In":
                return labels.get(key) in values
            if op == "NotIn":
                return labels.get(key) not in values
            if op == "Exists":
                return key in labels
            return key not in labels  # DoesNotExist

        if not any(
            term.get("matchExpressions") and all(map(holds, term["matchExpressions"]))
            for term in terms
        ):
            return False
    return all(
        tolerated(t) for t in node_spec.get("taints") or [] if t["effect"] != "PreferNoSchedule"
    )


KEYS = ("product", "rack", "pool")
VALUES = ("x", "y")
EFFECTS = ("NoSchedule", "NoExecute", "PreferNoSchedule")

labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)
taint_st = st.fixed_dictionaries(
    {
        "key": st.sampled_from(KEYS),
        "value": st.sampled_from(VALUES),
        "effect": st.sampled_from(EFFECTS),
    }
)
toleration_st = st.one_of(
    st.fixed_dictionaries(
        {"key": st.sampled_from(KEYS), "operator": st.just("Exists")},
        optional={"effect": st.sampled_from(EFFECTS)},
    ),
    st.fixed_dictionaries(
        {
            "key": st.sampled_from(KEYS),
            "operator": st.just("Equal"),
            "value": st.sampled_from(VALUES),
        },
        optional={"effect": st.sampled_from(EFFECTS)},
    ),
)
requirement_st = st.one_of(
    st.builds(
        lambda k, op, vs: {"key": k, "operator": op, "values": vs},
        st.sampled_from(KEYS),
        st.sampled_from(("In", "NotIn")),
        st.lists(st.sampled_from(VALUES), min_size=1, max_size=2, unique=True),
    ),
    st.builds(
        lambda k, op: {"key": k, "operator": op},
        st.sampled_from(KEYS),
        st.sampled_from(("Exists", "DoesNotExist")),
    ),
)
terms_st = st.one_of(
    st.none(),
    st.lists(
        st.fixed_dictionaries(
            {"matchExpressions": st.lists(requirement_st, min_size=1, max_size=2)}
        ),
        min_size=1,
        max_size=2,
    ),
)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    count = draw(st.integers(1, 8))
    nodes = [
        node(
            f"n{i}",
            draw(labels_st),
            draw(st.lists(taint_st, max_size=2)),
            draw(st.booleans()),
            gpus=draw(st.sampled_from((0, 4, 8))),
        )
        for i in range(count)
    ]
    pod_dict = pod(
        draw(st.one_of(st.none(), labels_st)),
        draw(terms_st),
        draw(st.lists(toleration_st, max_size=3)),
        gpus=draw(st.sampled_from((1, 4, 8))),
    )
    return nodes, pod_dict, draw(st.integers(1, 6))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_placements_use_only_nodes_kube_scheduler_accepts(
    case: tuple[list[dict[str, Any]], dict[str, Any], int],
) -> None:
    nodes, pod_dict, pods = case
    snapshot = CapacitySnapshot.from_objects(nodes)
    request = gang_of(pod_dict, pods)
    result = place_gang(
        snapshot, request, GENERIC, CapacitySnapshot.from_objects(nodes, capacity=True)
    )
    by_name = {n["metadata"]["name"]: n for n in nodes}
    accepted = [n for n in nodes if oracle_accepts(pod_dict, n)]
    per_pod = request.per_pod[GPU]
    room = sum(int(n["status"]["allocatable"][GPU]) // per_pod for n in accepted)
    if isinstance(result, Placement):
        assert all(oracle_accepts(pod_dict, by_name[name]) for name in result.nodes)
        for name in set(result.nodes):
            assert result.nodes.count(name) * per_pod <= int(
                by_name[name]["status"]["allocatable"][GPU]
            )
    else:
        # Complete as well as sound: it refuses only when the accepted nodes lack the room.
        assert room < pods, (result, room)
        if not accepted:
            unconstrained = [n for n in nodes if not n["spec"]["unschedulable"]]
            if len(unconstrained) == len(nodes) or not any(
                oracle_accepts(pod_dict, {**n, "spec": {**n["spec"], "unschedulable": False}})
                for n in nodes
            ):
                assert result.permanent, result


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario(), scenario())
def test_admission_never_books_a_node_past_its_gpus(
    first: tuple[list[dict[str, Any]], dict[str, Any], int],
    second: tuple[list[dict[str, Any]], dict[str, Any], int],
) -> None:
    nodes = first[0]
    requests = [gang_of(first[1], first[2], "a"), gang_of(second[1], second[2], "b")]
    decisions = admit(CapacitySnapshot.from_objects(nodes), requests, GENERIC)
    booked: dict[str, int] = {}
    for request, result in decisions:
        if isinstance(result, Placement):
            for name in result.nodes:
                booked[name] = booked.get(name, 0) + request.per_pod[GPU]
    for n in nodes:
        assert booked.get(n["metadata"]["name"], 0) <= int(n["status"]["allocatable"][GPU])


def test_taint_renders_as_kubectl_shows_it() -> None:
    assert str(Taint("rack", "maint", "NoSchedule")) == "rack=maint:NoSchedule"
    assert str(Taint("rack", "", "NoExecute")) == "rack:NoExecute"


def test_a_pod_too_big_for_every_node_it_may_use_names_the_nodes_it_may_not() -> None:
    nodes = [node("small", {PRODUCT: "H100"}, gpus=4), node("big", {PRODUCT: "A100"})]
    request = gang_of(pod({PRODUCT: "H100"}), 1)
    result = place_gang(
        CapacitySnapshot.from_objects(nodes),
        request,
        GENERIC,
        CapacitySnapshot.from_objects(nodes, capacity=True),
    )
    assert isinstance(result, Unplaceable)
    assert result.reason == Reason.POD_EXCEEDS_NODE_CAPACITY
    assert "(largest node: 4)" in result.message
    assert "1 other node refused by the pods' scheduling constraints" in result.message
