"""The local control plane behaves like a small GPU cluster: nodes, scheduling, kwok stages,
garbage collection, and `phalanx dev status`."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from typer.testing import CliRunner

from phalanx.devcluster import netns
from phalanx.devcluster.cli import app
from phalanx.devcluster.cluster import DevCluster
from phalanx.devcluster.kwok_stages import FAKE_DURATION, FAKE_EXIT_CODE, FAKE_OUTCOME
from phalanx.devcluster.testing import ClusterHandle, Kubectl, wait_for

pytestmark = pytest.mark.integration

TOPOLOGY_LABELS = (
    "kubernetes.io/hostname",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "phalanx.dev/block",
    "phalanx.dev/rack",
    "nvidia.com/gpu.clique",
)


def gpu_pod(name: str, gpus: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "trainer",
                    "image": "phalanx/trainer:dev",
                    "resources": {
                        "limits": {"nvidia.com/gpu": str(gpus)},
                        "requests": {"cpu": "1", "memory": "1Gi"},
                    },
                }
            ],
        },
    }


def pod(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = kubectl.json("get", "pod", name, "-n", namespace)
    return result


def test_every_node_is_ready_with_gpus_and_topology_labels(kubectl: Kubectl) -> None:
    nodes = kubectl.json("get", "nodes", "-l", "phalanx.dev/profile=gpu")["items"]

    assert len(nodes) >= 64
    for node in nodes:
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", node["metadata"]["name"]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        labels = node["metadata"]["labels"]
        assert all(label in labels for label in TOPOLOGY_LABELS), labels
        assert labels["nvidia.com/gpu.clique"] == labels["phalanx.dev/rack"]


def test_pod_asking_for_a_whole_host_runs_on_a_fake_node(kubectl: Kubectl, namespace: str) -> None:
    kubectl.create(namespace, gpu_pod("whole-host", 8))

    running = wait_for(
        lambda: (
            (p := pod(kubectl, namespace, "whole-host"))["status"].get("phase") == "Running" and p
        ),
        30,
        "pod whole-host to be Running",
    )
    assert running["spec"]["nodeName"].startswith("gpu-")
    assert running["status"]["podIP"]
    assert all(c["ready"] for c in running["status"]["containerStatuses"])


def test_a_service_of_fake_pods_gets_endpoints_that_answer_in_the_cluster_network(
    dev_cluster: ClusterHandle, kubectl: Kubectl, namespace: str
) -> None:
    if (reason := netns.available()) is not None:
        pytest.skip(f"fake pods get loopback addresses here: {reason}")
    if dev_cluster.state_dir is None:
        pytest.skip("PHALANX_TEST_KUBECONFIG: a cluster started elsewhere")
    assert DevCluster(dev_cluster.state_dir).namespace(), "the cluster has its own namespace"
    fake = gpu_pod("served", 1)
    fake["metadata"]["labels"] = {"app": "served"}
    kubectl.create(namespace, fake)
    kubectl.create(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "served"},
            "spec": {"selector": {"app": "served"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )

    def endpoint() -> str | None:
        slices = kubectl.json(
            "get", "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=served"
        )["items"]
        addresses = [a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"]]
        return addresses[0] if addresses else None

    address = wait_for(endpoint, 60, "an EndpointSlice address for Service served")
    assert address == pod(kubectl, namespace, "served")["status"]["podIP"]
    assert not ipaddress.ip_address(address).is_loopback
    # The address is served and dialled inside the cluster's namespace, as a pod's would be.
    with (
        socket.create_server((address, 0)) as server,
        socket.create_connection(server.getsockname()[:2], timeout=5),
    ):
        accepted, _ = server.accept()
        accepted.close()


def test_pod_asking_for_more_gpus_than_a_host_has_stays_unschedulable(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl.create(namespace, gpu_pod("too-big", 9))

    def unschedulable() -> dict[str, Any] | None:
        conditions = pod(kubectl, namespace, "too-big")["status"].get("conditions", [])
        return next(
            (c for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"), None
        )

    condition = wait_for(unschedulable, 30, "pod too-big to be marked unschedulable")
    assert condition["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in condition["message"]
    assert pod(kubectl, namespace, "too-big")["status"]["phase"] == "Pending"


@pytest.mark.parametrize(
    ("outcome", "exit_code"),
    [("Failed", 3), ("Succeeded", 0)],
    ids=["failed-with-exit-code-3", "succeeded"],
)
def test_outcome_annotation_ends_the_pod_after_the_chosen_duration(
    kubectl: Kubectl, namespace: str, outcome: str, exit_code: int
) -> None:
    annotations = {FAKE_OUTCOME: outcome, FAKE_DURATION: "2s"}
    if outcome == "Failed":
        annotations[FAKE_EXIT_CODE] = str(exit_code)
    kubectl.create(namespace, gpu_pod("rank-0", 8, annotations))

    wait_for(
        lambda: pod(kubectl, namespace, "rank-0")["status"].get("phase") in ("Running", outcome),
        30,
        "pod rank-0 to start",
    )
    finished = wait_for(
        lambda: (p := pod(kubectl, namespace, "rank-0"))["status"].get("phase") == outcome and p,
        30,
        f"pod rank-0 to become {outcome}",
    )
    terminated = finished["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == exit_code
    assert terminated["reason"] == ("Completed" if outcome == "Succeeded" else "Error")


def test_deleted_pod_is_finalized_by_the_fake_kubelet(kubectl: Kubectl, namespace: str) -> None:
    kubectl.create(namespace, gpu_pod("short-lived", 1))
    wait_for(
        lambda: pod(kubectl, namespace, "short-lived")["status"].get("phase") == "Running",
        30,
        "pod short-lived to be Running",
    )

    kubectl("delete", "pod", "short-lived", "-n", namespace, "--wait=false")

    wait_for(
        lambda: not kubectl.exists("pod", "short-lived", "-n", namespace),
        30,
        "pod short-lived to disappear",
    )


def test_a_pod_held_by_a_finalizer_ends_before_it_is_removed(
    kubectl: Kubectl, namespace: str
) -> None:
    # As a kubelet does: the containers are stopped and the pod reports Failed while another
    # controller's finalizer (Kueue's, for one) holds it; it goes once the finalizer does.
    manifest = gpu_pod("held", 1)
    manifest["metadata"]["finalizers"] = ["example.com/hold"]
    kubectl.create(namespace, manifest)
    wait_for(
        lambda: pod(kubectl, namespace, "held")["status"].get("phase") == "Running",
        30,
        "pod held to be Running",
    )

    kubectl("delete", "pod", "held", "-n", namespace, "--wait=false")

    ended = wait_for(
        lambda: (p := pod(kubectl, namespace, "held"))["status"].get("phase") == "Failed" and p,
        30,
        "pod held to report Failed",
    )
    assert ended["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143
    kubectl("patch", "pod", "held", "-n", namespace, "--type=json",
            "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')  # fmt: skip
    wait_for(
        lambda: not kubectl.exists("pod", "held", "-n", namespace), 30, "pod held to disappear"
    )


def test_garbage_collector_deletes_what_an_owner_owned(kubectl: Kubectl, namespace: str) -> None:
    kubectl.create(
        namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}
    )
    owner_uid = kubectl.json("get", "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    owned = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owned",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
            ],
        },
    }
    kubectl.create(namespace, owned)

    kubectl("delete", "configmap", "owner", "-n", namespace)

    wait_for(
        lambda: not kubectl.exists("configmap", "owned", "-n", namespace),
        60,
        "the garbage collector to delete configmap owned",
    )


def test_deployment_controller_creates_running_replicas(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "deployment", "web", "--image=nginx", "--replicas=2", "-n", namespace)

    wait_for(
        lambda: (
            kubectl.json("get", "deployment", "web", "-n", namespace)["status"].get("readyReplicas")
            == 2
        ),
        60,
        "deployment web to have 2 ready replicas",
    )


def test_kubectl_reports_the_pinned_release(kubectl: Kubectl) -> None:
    versions = kubectl.json("version")

    assert versions["clientVersion"]["gitVersion"] == "v1.36.3"
    assert versions["serverVersion"]["gitVersion"] == "v1.36.3"


def test_dev_status_shows_running_components_and_gpu_count(dev_cluster: ClusterHandle) -> None:
    if dev_cluster.state_dir is None:
        pytest.skip("status needs the state directory of a cluster this session started")
    result = CliRunner().invoke(app, ["status", "--dir", str(dev_cluster.state_dir)])

    assert result.exit_code == 0, result.output
    for component in (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
    ):
        assert any(
            line.split()[:2] == [component, "running"] for line in result.output.splitlines()
        ), result.output
    assert "64/64 Ready, 512 nvidia.com/gpu" in result.output
