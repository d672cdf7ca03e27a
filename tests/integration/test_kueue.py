"""`gangScheduler: kueue` against a real Kueue (built from the Go module proxy) beside the dev
cluster, with topology-aware scheduling over the operator's levels: Kueue admits the gang's
pod group as one Workload and places it in one rack, and the gang's end finishes the
Workload, so the quota it held comes back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from jobkit import Jobs, node_labels

from phalanx.devcluster import build
from phalanx.devcluster.cluster import DevCluster
from phalanx.devcluster.testing import ClusterHandle, Kubectl, wait_for
from phalanx.devcluster.versions import KUEUE_BINARY
from phalanx.placement import Topology

KUEUE_GATE = "kueue.x-k8s.io/admission"


@pytest.fixture(scope="module")
def kueue(dev_cluster: ClusterHandle) -> Iterator[DevCluster]:
    if dev_cluster.state_dir is None:
        pytest.skip("Kueue is started beside a dev cluster this session started")
    if build.built_tool(KUEUE_BINARY) is None:
        pytest.fail("these tests need Kueue: run `phalanx dev build --with kueue`", pytrace=False)
    cluster = DevCluster(dev_cluster.state_dir)
    topology = Topology.parse("generic")
    nodes = len(cluster.kubectl("get", "nodes", "-o", "name").split())
    cluster.start_kueue(
        levels=[level.label for level in topology.levels],
        node_labels={"nvidia.com/gpu.present": "true"},
        quota={"nvidia.com/gpu": str(8 * nodes)},
    )
    try:
        yield cluster
    finally:
        cluster.stop_kueue()


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")


def workloads(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.json("get", "workloads.kueue.x-k8s.io", "-n", namespace)[
        "items"
    ]
    return items


def condition(obj: dict[str, Any], kind: str) -> bool:
    return any(
        c["type"] == kind and c["status"] == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def apply_rack_gang(kueue: DevCluster, jobs: Jobs, name: str, nodes: int) -> None:
    """A gang of whole 8-GPU hosts handed to Kueue through the namespace's LocalQueue, which
    must place it inside one rack."""
    jobs.apply(
        name,
        nodes=nodes,
        accelerator={"type": "nvidia", "perNode": 8},
        runPolicy={"gangScheduler": "kueue", "queueName": kueue.kueue_queue(jobs.namespace)},
        topology={"required": "rack"},
    )


def kueue_gated(pod: dict[str, Any]) -> bool:
    return KUEUE_GATE in [g["name"] for g in pod["spec"].get("schedulingGates") or []]


def test_kueue_admits_the_gang_as_one_workload_in_one_rack_and_its_end_frees_the_quota(
    kueue: DevCluster,
    kubectl: Kubectl,
    namespace: str,
    run_operator: Callable[..., Any],
) -> None:
    jobs = Jobs(kubectl, namespace)
    with run_operator():
        apply_rack_gang(kueue, jobs, "tas", 4)
        pods = wait_for(
            lambda: (p := jobs.pods("tas")) and len(p) == 4 and all(
                x["spec"].get("nodeName") for x in p
            ) and p,
            120,
            "Kueue to admit the gang and kube-scheduler to bind it",
        )  # fmt: skip
        # Kueue's own gate held the pods until it admitted the whole group, and its
        # topology-aware placement put them in one rack.
        assert not any(kueue_gated(p) for p in pods)
        racks = {node_labels(kubectl, p["spec"]["nodeName"])["phalanx.dev/rack"] for p in pods}
        assert len(racks) == 1, racks
        (workload,) = workloads(kubectl, namespace)
        assert condition(workload, "Admitted")
        assert workload["spec"]["podSets"][0]["count"] == 4
        jobs.wait_condition("tas", "Admitted", "True", timeout=60)

        kubectl("delete", "llmtrainjob", "tas", "-n", namespace, "--wait=false")
        # The pods end, Kueue lets them go and finishes the Workload: its quota is free.
        wait_for(lambda: not jobs.pods("tas"), 90, "the gang's pods to be gone")
        wait_for(
            lambda: all(condition(w, "Finished") for w in workloads(kubectl, namespace)),
            60,
            "Kueue to finish the Workload",
        )


def test_a_gang_no_rack_can_hold_stays_gated_by_kueue(
    kueue: DevCluster,
    kubectl: Kubectl,
    namespace: str,
    run_operator: Callable[..., Any],
) -> None:
    jobs = Jobs(kubectl, namespace)
    with run_operator():
        apply_rack_gang(kueue, jobs, "wide", 5)  # a rack of the gpu profile has 4 hosts
        pods = wait_for(
            lambda: (p := jobs.pods("wide")) and len(p) == 5 and p, 60, "the gang's pods"
        )
        # Kueue looked at the Workload and could not reserve a rack for it.
        wait_for(
            lambda: any(
                c["type"] == "QuotaReserved" and c["status"] == "False"
                for w in workloads(kubectl, namespace)
                for c in (w.get("status") or {}).get("conditions") or []
            ),
            60,
            "Kueue to find no room for the Workload",
        )
        pods = jobs.pods("wide")
        assert not any(p["spec"].get("nodeName") for p in pods)
        assert all(kueue_gated(p) for p in pods)
        (workload,) = workloads(kubectl, namespace)
        assert not condition(workload, "Admitted")
        admitted = jobs.condition("wide", "Admitted")
        assert admitted is not None
        assert admitted["status"] == "False", admitted
