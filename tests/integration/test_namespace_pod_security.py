"""Pod security levels on the real control plane: a namespace's `phalanx.dev/pod-security`
label decides what a pod template may unlock, and the API server's own Pod Security
Admission, enforcing the matching `pod-security.kubernetes.io/enforce` level, admits the pods
the operator renders for it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from jobkit import GPU_NODE, Jobs

from phalanx.constants import POD_SECURITY_LABEL, Reason
from phalanx.devcluster.testing import Kubectl, wait_for

PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
# A vendor image that runs as root and chowns its cache, reading a dataset from a filer:
# everything here is `baseline`, nothing `restricted`.
ROOT_IMAGE_TEMPLATE = {
    "spec": {
        "securityContext": {"runAsUser": 0},
        "volumes": [{"name": "data", "nfs": {"server": "filer.example", "path": "/datasets"}}],
        "containers": [
            {
                "name": "trainer",
                "securityContext": {"capabilities": {"add": ["CHOWN"]}},
                "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
            }
        ],
    }
}


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")


@pytest.fixture
def operator(run_operator: Callable[..., Any]) -> Iterator[Any]:
    with run_operator() as runner:
        yield runner


@pytest.fixture
def opted_out(kubectl: Kubectl, namespace: str) -> Iterator[str]:
    """A second namespace an admin opted out to `baseline`, for Phalanx and for PSA alike."""
    name = f"{namespace[:50]}-base"
    kubectl("create", "namespace", name)
    kubectl("label", "namespace", name, f"{POD_SECURITY_LABEL}=baseline", f"{PSA_ENFORCE}=baseline")
    wait_for(
        lambda: kubectl.exists("serviceaccount", "default", "-n", name),
        30,
        f"the default ServiceAccount in namespace {name}",
    )
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def root_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [{"name": "c", "image": "busybox", "securityContext": {"runAsUser": 0}}]
        },
    }


def test_a_template_beyond_restricted_runs_only_where_an_admin_opted_the_namespace_out(
    kubectl: Kubectl, namespace: str, opted_out: str, operator: Any
) -> None:
    kubectl("label", "namespace", namespace, f"{PSA_ENFORCE}=restricted")
    # Pod Security Admission is on in this API server: it refuses a root pod here, so the
    # pods it admits below were checked against the level, not waved through.
    refused = kubectl(
        "create", "-n", namespace, "-f", "-",
        stdin=json.dumps(root_pod(f"root-{uuid.uuid4().hex[:6]}")), check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "violates PodSecurity" in refused.stderr, refused.stderr

    restricted, baseline = Jobs(kubectl, namespace), Jobs(kubectl, opted_out)
    for jobs in (restricted, baseline):
        jobs.apply("vendor", nodes=2, accelerator=GPU_NODE, podTemplate=ROOT_IMAGE_TEMPLATE)

    # The opted-out namespace gets its pods, root and all, admitted by PSA `baseline`.
    pods = baseline.wait_pods("vendor", lambda p: len(p) == 2, 60, "both ranks created")
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsUser"] == 0
        [container] = pod["spec"]["containers"]
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert {"name": "data", "nfs": {"server": "filer.example", "path": "/datasets"}} in pod[
            "spec"
        ]["volumes"]

    # The restricted namespace: a condition naming each field and the label; no pods.
    condition = restricted.wait_condition("vendor", "Admitted", "False", Reason.POD_SECURITY_LEVEL)
    message = condition["message"]
    assert f"Namespace {namespace} is at pod security level restricted" in message
    for field in (
        "spec.podTemplate.spec.securityContext.runAsUser",
        "spec.podTemplate.spec.volumes[0].nfs",
        "spec.podTemplate.spec.containers[0].securityContext.capabilities.add[0]",
    ):
        assert field in message
    assert f"{POD_SECURITY_LABEL}=baseline" in message
    assert restricted.pods("vendor") == []
    assert len(restricted.events("vendor", Reason.POD_SECURITY_LEVEL)) == 1

    # A plain job beside it runs, its pods admitted by PSA `restricted`; meanwhile the refused
    # job was not written again (no hot loop) and got no second event.
    written = restricted.get("vendor")["metadata"]["resourceVersion"]
    restricted.apply("plain", nodes=2, accelerator=GPU_NODE)
    restricted.wait_pods("plain", lambda p: len(p) == 2, 60, "both ranks created")
    assert restricted.get("vendor")["metadata"]["resourceVersion"] == written
    assert len(restricted.events("vendor", Reason.POD_SECURITY_LEVEL)) == 1
    assert restricted.pods("vendor") == []

    # An admin opts the namespace out later: the refused job's pods are rendered from then on.
    kubectl(
        "label", "namespace", namespace, "--overwrite",
        f"{POD_SECURITY_LABEL}=baseline", f"{PSA_ENFORCE}=baseline",
    )  # fmt: skip
    pods = restricted.wait_pods("vendor", lambda p: len(p) == 2, 60, "ranks after the label")
    assert all(p["spec"]["securityContext"]["runAsUser"] == 0 for p in pods)
    restricted.wait_condition("vendor", "Admitted", "True", timeout=60)
