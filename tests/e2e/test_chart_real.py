"""The Helm chart on real kubelet nodes: the operator image built from images/operator/Dockerfile
runs as the chart's Deployment, under its ServiceAccount with in-cluster credentials, and
trains a job to the end.

The session's operator (a process beside the cluster) is stopped for this test, so the chart's
is the only one reconciling, and started again afterwards. The dev cluster has no service
proxy, so the chart's operator runs in the node's network namespace (`hostNetwork`) and is told
the API server's address there (`KUBERNETES_SERVICE_HOST`/`_PORT`, as on a cluster bootstrapped
without kube-proxy); everything else is the chart's defaults.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realkit import RealCluster, job, trainjob, wait_phase

from phalanx.devcluster import build
from phalanx.devcluster.cluster import OPERATOR
from phalanx.devcluster.images import OPERATOR_IMAGE
from phalanx.devcluster.processes import stop_process
from phalanx.devcluster.testing import wait_for

CHART = Path(__file__).resolve().parents[2] / "charts" / "phalanx"
RELEASE = "phalanx"
RELEASE_NAMESPACE = "phalanx-system"
# Free in the cluster's network namespace (the session operator uses 18080/18081).
METRICS_PORT, LIVENESS_PORT = 28080, 28081


def helm(real_cluster: RealCluster, *args: str, check: bool = True) -> str:
    result = subprocess.run(
        [str(build.ensure_helm()), f"--kubeconfig={real_cluster.handle.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
    return result.stdout


@pytest.fixture
def chart_operator(real_cluster: RealCluster) -> Iterator[dict[str, Any]]:
    """The chart installed with the operator image; yields its running operator pod."""
    cluster = real_cluster.cluster
    stop_process(cluster.layout.pid_file(OPERATOR))
    repository, _, tag = OPERATOR_IMAGE.rpartition(":")
    apiserver = cluster.layout.read_ports().apiserver
    kubectl = real_cluster.kubectl
    try:
        helm(
            real_cluster,
            "install", RELEASE, str(CHART),
            "--namespace", RELEASE_NAMESPACE, "--create-namespace",
            # The session applied crds/ already (not as Helm objects).
            "--set", "crds.install=false",
            "--set", f"image.repository={repository}",
            "--set", f"image.tag={tag}",
            "--set", "image.pullPolicy=Never",
            "--set", "hostNetwork=true",
            "--set", f"operator.metricsPort={METRICS_PORT}",
            "--set", f"operator.livenessPort={LIVENESS_PORT}",
            "--set", "operator.progressIntervalSeconds=2",
            "--set", "extraEnv[0].name=KUBERNETES_SERVICE_HOST",
            "--set", "extraEnv[0].value=127.0.0.1",
            "--set", "extraEnv[1].name=KUBERNETES_SERVICE_PORT",
            "--set-string", f"extraEnv[1].value={apiserver}",
        )  # fmt: skip

        def ready_pod() -> dict[str, Any] | None:
            pods = kubectl.json(
                "get", "pods", "-n", RELEASE_NAMESPACE, "-l", "app.kubernetes.io/name=phalanx"
            )["items"]
            for pod in pods:
                conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
                if conditions.get("Ready") == "True":
                    return dict(pod)
            return None

        try:
            pod = wait_for(ready_pod, 180, "the chart's operator pod to be Ready", interval=1)
        except AssertionError as error:
            described = kubectl("describe", "pods", "-n", RELEASE_NAMESPACE, check=False).stdout
            raise AssertionError(
                f"{error}\n{described[-3000:]}\n{operator_log(real_cluster)}"
            ) from None
        yield pod
    finally:
        helm(real_cluster, "uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait", check=False)
        kubectl("delete", "namespace", RELEASE_NAMESPACE, "--wait=true", timeout=120, check=False)
        cluster.start_operator({"PHALANX_PROGRESS_INTERVAL": "2"})


def operator_log(real_cluster: RealCluster, tail: int = 200) -> str:
    result = real_cluster.kubectl(
        "logs", "-n", RELEASE_NAMESPACE, "-l", "app.kubernetes.io/name=phalanx", f"--tail={tail}",
        check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


def test_the_chart_operator_trains_a_job_from_inside_the_cluster(
    real_cluster: RealCluster, namespace: str, chart_operator: dict[str, Any]
) -> None:
    kubectl = real_cluster.kubectl
    pod = chart_operator
    # A real node, the image built here, the chart's ServiceAccount and its projected token.
    real_nodes = {n.name for n in real_cluster.cluster.real_nodes()}
    assert pod["spec"]["nodeName"] in real_nodes
    assert pod["spec"]["containers"][0]["image"] == OPERATOR_IMAGE
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-operator"
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0

    kubectl.create(namespace, trainjob("chart-job", steps=20))
    try:
        done = wait_phase(real_cluster, namespace, "chart-job", "Succeeded", 900)
    except AssertionError as error:
        raise AssertionError(
            f"{error}\nchart operator log:\n{operator_log(real_cluster)}"
        ) from None
    assert done["status"]["progress"]["step"] == 20
    assert job(kubectl, namespace, "chart-job")["status"]["placement"]["nodes"]

    log = operator_log(real_cluster, tail=-1)
    assert "Forbidden" not in log, log[-3000:]
    assert "phalanx operator started" in log, log[-3000:]  # logLevel info: the operator's line
    print(f"chart operator ran on {pod['spec']['nodeName']}", file=sys.stderr)
