"""Bad input on real nodes gets a condition that says what is wrong, never a silent hang."""

from __future__ import annotations

from typing import Any

from realkit import RealCluster, trainjob

from phalanx.devcluster.testing import Kubectl, wait_for


def condition_mentioning(
    kubectl: Kubectl, kind: str, namespace: str, name: str, *words: str
) -> dict[str, Any] | None:
    status = kubectl.json("get", kind, name, "-n", namespace).get("status", {})
    for condition in status.get("conditions", []):
        text = f"{condition.get('reason', '')} {condition.get('message', '')}"
        if all(word in text for word in words):
            return condition  # type: ignore[no-any-return]
    return None


def test_an_image_that_does_not_exist_is_named_in_a_condition(
    real_cluster: RealCluster, namespace: str
) -> None:
    kubectl = real_cluster.kubectl
    manifest = trainjob("noimage")
    manifest["spec"]["image"] = "localhost/phalanx/does-not-exist:1"
    kubectl.create(namespace, manifest)
    condition = wait_for(
        lambda: condition_mentioning(
            kubectl, "llmtrainjob", namespace, "noimage", "localhost/phalanx/does-not-exist:1"
        ),
        240,
        "a condition naming the missing image",
        interval=1,
    )
    assert condition["reason"] == "ImagePullFailed", condition


def test_a_server_that_crash_loops_says_so(real_cluster: RealCluster, namespace: str) -> None:
    kubectl = real_cluster.kubectl
    manifest = {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "crashy"},
        "spec": {
            "model": {"claim": {"name": "empty-models"}},
            "replicas": 1,
            "accelerator": {"type": "cpu", "cpu": "250m", "memory": "1Gi"},
        },
    }
    kubectl(
        "create",
        "-n",
        namespace,
        "-f",
        "-",
        stdin='{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "empty-models"},'
        ' "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}',
    )
    kubectl.create(namespace, manifest)
    condition = wait_for(
        lambda: condition_mentioning(
            kubectl, "inferenceservices.phalanx.dev", namespace, "crashy", "CrashLoopBackOff"
        ),
        300,
        "a condition saying the server crash-loops",
        interval=1,
    )
    # The server exits with its reason (an empty claim has no model) and the condition says it.
    assert (condition["type"], condition["status"]) == ("Ready", "False"), condition
    assert "last exit code 3" in condition["message"], condition
    assert "no config.json" in condition["message"], condition


def test_a_pod_the_api_server_rejects_is_reported_without_a_hot_loop(
    real_cluster: RealCluster, namespace: str
) -> None:
    kubectl = real_cluster.kubectl
    manifest = trainjob("rejected")
    # Valid to the CRD, refused by the API server's Priority admission at pod create time.
    manifest["spec"]["runPolicy"] = {"priorityClassName": "no-such-priority-class"}
    kubectl.create(namespace, manifest)
    condition = wait_for(
        lambda: condition_mentioning(
            kubectl, "llmtrainjob", namespace, "rejected", "PodCreateRejected"
        ),
        120,
        "the PodCreateRejected condition",
        interval=1,
    )
    assert "no-such-priority-class" in condition["message"], condition
    creates = real_cluster.operator_output().count("no-such-priority-class")
    assert creates < 20, f"the operator retried the rejected create {creates} times"
