"""A placed pod reaches its node by the node's name, so a node whose `kubernetes.io/hostname`
label differs from its name (as on some providers) still gets the pods placed on it: a gated
pod is pinned by a `matchFields metadata.name` node affinity for kube-scheduler to bind, a pod
placed before it exists is created bound (`spec.nodeName`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from jobkit import Jobs, outcome

from phalanx.devcluster.profiles import get_profile, render_nodes
from phalanx.devcluster.testing import Kubectl

# Only the node added here has this resource, so placement can choose no other.
SLOT = "example.com/pinning-slot"
NODE = "pin-by-name-0"


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")


@pytest.fixture
def renamed_node(kubectl: Kubectl) -> Iterator[str]:
    [node] = render_nodes(get_profile("gpu"), 1)
    node["metadata"]["name"] = NODE
    node["metadata"]["labels"]["kubernetes.io/hostname"] = "ip-10-9-8-7.internal"
    node["status"]["addresses"] = [{"type": "Hostname", "address": "ip-10-9-8-7.internal"}]
    for part in ("capacity", "allocatable"):
        node["status"][part][SLOT] = "1"
    kubectl("apply", "-f", "-", stdin=json.dumps(node))
    try:
        yield NODE
    finally:
        kubectl("delete", "node", NODE, "--wait=false", check=False)


def test_a_gang_runs_on_a_node_whose_hostname_label_is_not_its_name(
    kubectl: Kubectl, run_operator: Callable[..., Any], namespace: str, renamed_node: str
) -> None:
    jobs = Jobs(kubectl, namespace)
    slot = {"requests": {SLOT: 1}, "limits": {SLOT: 1}}
    with run_operator():
        jobs.apply(
            "pinned",
            accelerator={"type": "cpu", "cpu": "100m"},
            # A scheduler named by the job binds: the pods take the gated path.
            runPolicy={"schedulerName": "default-scheduler"},
            podTemplate={
                **outcome("Succeeded", "2s"),
                "spec": {"containers": [{"name": "trainer", "resources": slot}]},
            },
        )
        jobs.wait_phase("pinned", "Succeeded", timeout=90)

    [pod] = jobs.pods("pinned")
    assert pod["spec"]["nodeName"] == renamed_node
    assert "kubernetes.io/hostname" not in (pod["spec"].get("nodeSelector") or {})
    required = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert required["nodeSelectorTerms"] == [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [renamed_node]}]}
    ]


def test_a_gang_placed_before_its_pods_exist_is_created_bound_to_that_node(
    kubectl: Kubectl, run_operator: Callable[..., Any], namespace: str, renamed_node: str
) -> None:
    jobs = Jobs(kubectl, namespace)
    slot = {"requests": {SLOT: 1}, "limits": {SLOT: 1}}
    # Placeable at the admission loop's first look (a node not Ready yet would make the job
    # wait in the queue as gated pods).
    kubectl("wait", "--for=condition=Ready", f"node/{renamed_node}", "--timeout=60s")
    with run_operator():
        jobs.apply(
            "bound",
            accelerator={"type": "cpu", "cpu": "100m"},
            checkpoint={"enabled": False},
            podTemplate={
                **outcome("Succeeded", "2s"),
                "spec": {"containers": [{"name": "trainer", "resources": slot}]},
            },
        )
        jobs.wait_phase("bound", "Succeeded", timeout=90)

    [pod] = jobs.pods("bound")
    assert pod["spec"]["nodeName"] == renamed_node
    assert not pod["spec"].get("schedulingGates")
    # No pin for kube-scheduler: the pod never went through it.
    assert "affinity" not in pod["spec"]
    assert jobs.status("bound")["placement"]["nodes"] == [renamed_node]
