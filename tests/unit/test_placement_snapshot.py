"""The capacity snapshot built from raw Node and Pod dicts, and pod request accounting."""

from __future__ import annotations

from typing import Any

import pytest

from phalanx.placement import DEFAULT_TOPOLOGY, PRESETS, GangRequest, Placement, place_gang
from phalanx.placement.filters import PodConstraints, Toleration
from phalanx.placement.snapshot import (
    CapacitySnapshot,
    NodeInfo,
    pod_demand,
    pod_requests,
    slots_on,
)

GPU = "nvidia.com/gpu"
GI = 2**30


def make_node(
    name: str,
    *,
    ready: str = "True",
    unschedulable: bool = False,
    taints: list[dict[str, str]] | None = None,
    hostname: str | None = None,
    gpus: int = 8,
) -> dict[str, Any]:
    """A Node as the API server returns it."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": hostname or name,
                "phalanx.dev/rack": "r1",
            },
        },
        "spec": {"unschedulable": unschedulable, "taints": taints or []},
        "status": {
            "allocatable": {"cpu": "63500m", "memory": "500Gi", GPU: str(gpus), "pods": "110"},
            "capacity": {"cpu": "64", "memory": "512Gi", GPU: str(gpus), "pods": "110"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": ready, "reason": "KubeletReady"},
            ],
        },
    }


def make_pod(
    name: str,
    *,
    node: str | None = None,
    phase: str = "Running",
    gates: list[str] | None = None,
    selector_host: str | None = None,
    gpus: int = 8,
    cpu: str = "8",
    memory: str = "64Gi",
) -> dict[str, Any]:
    """A Pod as the API server returns it; bound when ``node`` is given."""
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "trainer",
                "resources": {
                    "requests": {"cpu": cpu, "memory": memory},
                    "limits": {GPU: str(gpus)},
                },
            }
        ],
    }
    if node is not None:
        spec["nodeName"] = node
    if gates:
        spec["schedulingGates"] = [{"name": gate} for gate in gates]
    if selector_host is not None:
        spec["nodeSelector"] = {"kubernetes.io/hostname": selector_host}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
        "status": {"phase": phase},
    }


EMPTY = {"cpu": 63500, "memory": 500 * GI, GPU: 8, "pods": 110}
ONE_POD = {"cpu": 63500 - 8000, "memory": 436 * GI, GPU: 0, "pods": 109}


TRAINING_POD = PodConstraints(tolerations=(Toleration(GPU, "Exists", "", "NoSchedule"),))


def usable(snapshot: CapacitySnapshot) -> bool:
    """Whether a one-pod training gang (tolerating the GPU taint) could be placed on n1."""
    request = GangRequest("g", 1, {GPU: 8}, constraints=TRAINING_POD)
    return isinstance(place_gang(snapshot, request, PRESETS[DEFAULT_TOPOLOGY]), Placement)


@pytest.mark.parametrize(
    ("node", "kept"),
    [
        pytest.param(make_node("n1"), True, id="ready"),
        pytest.param(make_node("n1", ready="False"), False, id="not-ready"),
        pytest.param(make_node("n1", ready="Unknown"), False, id="ready-unknown"),
        pytest.param(make_node("n1", unschedulable=True), False, id="cordoned"),
        pytest.param(
            make_node(
                "n1", taints=[{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]
            ),
            False,
            id="unreachable-taint",
        ),
        pytest.param(
            make_node(
                "n1", taints=[{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]
            ),
            False,
            id="not-ready-taint",
        ),
        pytest.param(
            make_node("n1", taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]),
            True,
            id="gpu-taint-is-tolerated-by-training-pods",
        ),
        pytest.param(
            make_node(
                "n1",
                taints=[{"key": "node.kubernetes.io/unreachable", "effect": "PreferNoSchedule"}],
            ),
            True,
            id="soft-taint",
        ),
        pytest.param(
            {"metadata": {"name": "n1"}, "status": {"allocatable": {GPU: "8"}}},
            False,
            id="no-conditions",
        ),
    ],
)
def test_node_filter(node: dict[str, Any], kept: bool) -> None:
    assert usable(CapacitySnapshot.from_objects([node])) is kept


@pytest.mark.parametrize(
    ("node", "counted"),
    [
        pytest.param(make_node("n1", ready="False"), True, id="not-ready"),
        pytest.param(make_node("n1", unschedulable=True), True, id="cordoned"),
        pytest.param(
            make_node(
                "n1", taints=[{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]
            ),
            True,
            id="not-ready-taint",
        ),
        pytest.param(
            make_node("n1", taints=[{"key": "maintenance", "effect": "NoSchedule"}]),
            False,
            id="user-taint-stays",
        ),
    ],
)
def test_capacity_counts_nodes_that_are_only_temporarily_unschedulable(
    node: dict[str, Any], counted: bool
) -> None:
    assert usable(CapacitySnapshot.from_objects([node], capacity=True)) is counted


def test_allocatable_is_parsed_into_placement_units() -> None:
    snapshot = CapacitySnapshot.from_objects([make_node("n1")])
    assert snapshot.nodes == (
        NodeInfo(
            "n1",
            {"kubernetes.io/hostname": "n1", "phalanx.dev/rack": "r1"},
            EMPTY,
        ),
    )


def test_avoided_nodes_are_left_out() -> None:
    snapshot = CapacitySnapshot.from_objects([make_node("n1"), make_node("n2")], avoid={"n2"})
    assert [node.name for node in snapshot.nodes] == ["n1"]


@pytest.mark.parametrize(
    ("pod", "free"),
    [
        pytest.param(make_pod("p", node="n1"), ONE_POD, id="bound-running"),
        pytest.param(make_pod("p", node="n1", phase="Pending"), ONE_POD, id="bound-pending"),
        pytest.param(make_pod("p", node="n1", phase="Succeeded"), EMPTY, id="succeeded"),
        pytest.param(make_pod("p", node="n1", phase="Failed"), EMPTY, id="failed"),
        pytest.param(
            make_pod("p", phase="Pending", gates=["phalanx.dev/gang"]), EMPTY, id="gated-unbound"
        ),
        pytest.param(
            make_pod("p", phase="Pending", gates=["phalanx.dev/gang"], selector_host="n1"),
            EMPTY,
            id="gated-with-selector",
        ),
        pytest.param(
            make_pod("p", phase="Pending", selector_host="n1"), ONE_POD, id="reserved-ungated"
        ),
        pytest.param(make_pod("p", phase="Pending"), EMPTY, id="pending-without-selector"),
        pytest.param(make_pod("p", node="elsewhere"), EMPTY, id="bound-to-unknown-node"),
    ],
)
def test_pod_accounting(pod: dict[str, Any], free: dict[str, int]) -> None:
    snapshot = CapacitySnapshot.from_objects([make_node("n1")], [pod])
    assert dict(snapshot.node("n1").free) == free


def test_reserved_pod_is_matched_through_the_hostname_label() -> None:
    nodes = [make_node("gpu-node-1.example", hostname="gpu-node-1")]
    pods = [make_pod("p", phase="Pending", selector_host="gpu-node-1")]
    snapshot = CapacitySnapshot.from_objects(nodes, pods)
    assert dict(snapshot.node("gpu-node-1.example").free) == ONE_POD


def test_many_pods_add_up_and_may_overcommit() -> None:
    pods = [make_pod(f"p{i}", node="n1", gpus=4, cpu="1", memory="1Gi") for i in range(3)]
    free = CapacitySnapshot.from_objects([make_node("n1")], pods).node("n1").free
    assert free[GPU] == -4  # kept exact: placement treats it as zero
    assert free["pods"] == 107
    assert free["cpu"] == 60500


def _pod_spec(**spec: Any) -> dict[str, Any]:
    return {"spec": spec}


def _container(
    requests: dict[str, str] | None = None, limits: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    return {"name": "c", "resources": resources, **extra}


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        pytest.param(_pod_spec(containers=[_container()]), {"pods": 1}, id="best-effort"),
        pytest.param(
            _pod_spec(
                containers=[_container({"cpu": "1"}), _container({"cpu": "500m", "memory": "1Gi"})]
            ),
            {"cpu": 1500, "memory": GI, "pods": 1},
            id="containers-sum",
        ),
        pytest.param(
            _pod_spec(containers=[_container(limits={"cpu": "2", GPU: "8"})]),
            {"cpu": 2000, GPU: 8, "pods": 1},
            id="limit-defaults-request",
        ),
        pytest.param(
            _pod_spec(containers=[_container({"cpu": "1"}, {"cpu": "4"})]),
            {"cpu": 1000, "pods": 1},
            id="request-wins-over-limit",
        ),
        pytest.param(
            _pod_spec(
                containers=[_container({"cpu": "1"})],
                initContainers=[
                    _container({"cpu": "3"}),
                    _container({"cpu": "2", "memory": "1Gi"}),
                ],
            ),
            {"cpu": 3000, "memory": GI, "pods": 1},
            id="init-containers-take-the-max",
        ),
        pytest.param(
            _pod_spec(
                containers=[_container({"cpu": "1"})],
                initContainers=[
                    _container({"cpu": "500m"}, restartPolicy="Always"),
                    _container({"cpu": "2"}),
                ],
            ),
            {"cpu": 2500, "pods": 1},
            id="sidecar-runs-beside-later-init",
        ),
        pytest.param(
            _pod_spec(
                containers=[_container({"cpu": "4"})],
                initContainers=[_container({"cpu": "500m"}, restartPolicy="Always")],
            ),
            {"cpu": 4500, "pods": 1},
            id="sidecar-runs-beside-containers",
        ),
        pytest.param(
            _pod_spec(
                containers=[_container({"cpu": "1"})], overhead={"cpu": "250m", "memory": "120Mi"}
            ),
            {"cpu": 1250, "memory": 120 * 2**20, "pods": 1},
            id="overhead-added",
        ),
    ],
)
def test_pod_requests(pod: dict[str, Any], expected: dict[str, int]) -> None:
    assert pod_requests(pod) == expected


def test_with_reserved_returns_a_new_snapshot() -> None:
    before = CapacitySnapshot(
        (NodeInfo("b", free={GPU: 8, "pods": 4}), NodeInfo("a", free={GPU: 8, "cpu": 1000}))
    )
    after = before.with_reserved(["a", "b", "b"], {GPU: 2, "cpu": 100})
    assert [node.name for node in after.nodes] == ["a", "b"]
    assert dict(after.node("a").free) == {GPU: 6, "cpu": 900}  # no pods count reported: none kept
    assert dict(after.node("b").free) == {GPU: 4, "cpu": -200, "pods": 2}
    assert dict(before.node("b").free) == {GPU: 8, "pods": 4}


def test_with_reserved_rejects_unknown_nodes() -> None:
    with pytest.raises(KeyError, match="missing from the snapshot"):
        CapacitySnapshot((NodeInfo("a"),)).with_reserved(["a", "z"], {GPU: 1})


def test_duplicate_node_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate node names in snapshot: a"):
        CapacitySnapshot((NodeInfo("a"), NodeInfo("a")))


def test_node_info_is_read_only() -> None:
    labels = {"x": "1"}
    node = NodeInfo("a", labels, {GPU: 1})
    labels["x"] = "2"
    assert node.labels["x"] == "1"
    with pytest.raises(TypeError):
        node.free[GPU] = 5  # type: ignore[index]


@pytest.mark.parametrize(
    ("free", "per_pod", "slots"),
    [
        pytest.param({GPU: 8, "pods": 110}, {GPU: 2}, 4, id="gpu-bound"),
        pytest.param({GPU: 8, "pods": 3}, {GPU: 1}, 3, id="pod-count-bound"),
        pytest.param({GPU: 8}, {GPU: 1}, 5, id="no-pod-count-reported"),
        pytest.param({GPU: 8, "cpu": 1000}, {GPU: 1, "cpu": 400}, 2, id="cpu-bound"),
        pytest.param({"cpu": 1000}, {GPU: 1}, 0, id="missing-resource-is-zero"),
        pytest.param({GPU: -2}, {GPU: 1}, 0, id="overcommitted"),
        pytest.param({}, {}, 5, id="nothing-asked"),
    ],
)
def test_slots_on(free: dict[str, int], per_pod: dict[str, int], slots: int) -> None:
    assert slots_on(free, pod_demand(per_pod), limit=5) == slots
