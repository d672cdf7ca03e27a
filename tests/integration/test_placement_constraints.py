"""Placement honours the pods' own scheduling constraints on a mixed cluster: the 64 fake H100
hosts, four A100 hosts added here, and one H100 rack tainted for maintenance. A gang placed on
a node kube-scheduler then refuses would stay partly Pending until its gang timeout; here every
gang must run where kube-scheduler agrees, or be told at once why it never can."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from jobkit import Jobs, gated, node_labels, outcome

from phalanx.devcluster.profiles import get_profile, render_nodes
from phalanx.devcluster.testing import Kubectl, wait_for

A100 = "NVIDIA-A100-SXM4-80GB"
H100 = "NVIDIA-H100-80GB-HBM3"
PRODUCT = "nvidia.com/gpu.product"
RACK = "phalanx.dev/rack"
TAINT = "phalanx.dev/maintenance"


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")


@pytest.fixture
def jobs(kubectl: Kubectl, namespace: str) -> Jobs:
    return Jobs(kubectl, namespace)


@pytest.fixture
def mixed_cluster(kubectl: Kubectl) -> Iterator[dict[str, list[str]]]:
    """Add an A100 rack of four hosts and taint the first H100 rack; undo both afterwards."""
    a100 = []
    for index, node in enumerate(render_nodes(get_profile("gpu"), 4)):
        name = f"a100-h{index}"
        labels = node["metadata"]["labels"]
        labels.update(
            {
                "kubernetes.io/hostname": name,
                PRODUCT: A100,
                RACK: "a100-r0",
                "nvidia.com/gpu.clique": "a100-r0",
                "phalanx.dev/block": "a100-b0",
            }
        )
        node["metadata"]["name"] = name
        node["status"]["addresses"] = [{"type": "Hostname", "address": name}]
        kubectl("apply", "-f", "-", stdin=json.dumps(node))
        a100.append(name)
    h100 = sorted(
        n["metadata"]["name"]
        for n in kubectl.json("get", "nodes", "-l", f"{PRODUCT}={H100}")["items"]
    )
    tainted_rack = node_labels(kubectl, h100[0])[RACK]
    tainted = [n for n in h100 if node_labels(kubectl, n)[RACK] == tainted_rack]
    for name in tainted:
        kubectl("taint", "node", name, f"{TAINT}=true:NoSchedule", "--overwrite")
    try:
        yield {"a100": a100, "tainted": tainted, "rack": [tainted_rack]}
    finally:
        for name in tainted:
            kubectl("taint", "node", name, f"{TAINT}-", check=False)
        kubectl("delete", "node", *a100, "--wait=false", check=False)


@pytest.fixture
def operator(run_operator: Callable[..., Any]) -> Iterator[Any]:
    with run_operator() as runner:
        yield runner


def nodes_of(pods: list[dict[str, Any]]) -> set[str]:
    return {p["spec"]["nodeName"] for p in pods}


def test_gangs_run_only_where_kube_scheduler_agrees(
    kubectl: Kubectl, jobs: Jobs, mixed_cluster: dict[str, list[str]], operator: Any
) -> None:
    tainted, rack = set(mixed_cluster["tainted"]), mixed_cluster["rack"][0]
    # Sixteen H100 hosts (one block) without tolerations, queued first: the block holding the
    # tainted rack is the first best fit by name, so the taint is the only thing in the way.
    jobs.apply(
        "wide",
        nodes=16,
        accelerator={"type": "nvidia", "perNode": 8, "product": H100},
        podTemplate=outcome("Succeeded", "300s"),
    )
    # accelerator.product sets a gpu.product nodeSelector: only the A100 rack qualifies.
    jobs.apply(
        "on-a100",
        nodes=4,
        accelerator={"type": "nvidia", "perNode": 8, "product": A100},
        podTemplate=outcome("Succeeded", "300s"),
    )
    # Pinned by node affinity to the tainted rack, which it tolerates.
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": RACK, "operator": "In", "values": [rack]}]}
                ]
            }
        }
    }
    toleration = {"key": TAINT, "operator": "Exists", "effect": "NoSchedule"}
    jobs.apply(
        "tolerant",
        nodes=4,
        accelerator={"type": "nvidia", "perNode": 8},
        podTemplate={
            **outcome("Succeeded", "300s"),
            "spec": {"affinity": affinity, "tolerations": [toleration]},
        },
    )
    # The same affinity without the toleration: no node is acceptable, ever.
    jobs.apply(
        "intolerant",
        nodes=1,
        accelerator={"type": "nvidia", "perNode": 8, "product": H100},
        podTemplate={**outcome("Succeeded", "300s"), "spec": {"affinity": affinity}},
    )
    jobs.wait_phase("on-a100", "Running", timeout=120)
    assert nodes_of(jobs.pods("on-a100")) == set(mixed_cluster["a100"])
    jobs.wait_phase("tolerant", "Running", timeout=120)
    assert nodes_of(jobs.pods("tolerant")) == tainted
    jobs.wait_phase("wide", "Running", timeout=120)
    wide = nodes_of(jobs.pods("wide"))
    assert not wide & tainted
    assert not wide & set(mixed_cluster["a100"])
    refused = jobs.wait_condition("intolerant", "Admitted", "False", "NoMatchingNodes", timeout=60)
    assert f"taint {TAINT}=true:NoSchedule is not tolerated" in refused["message"]
    assert "never fit" in refused["message"]
    assert all(gated(p) for p in jobs.pods("intolerant"))


@pytest.mark.parametrize("scheduler", ["none", "volcano", "coscheduling"])
def test_topology_a_scheduler_would_ignore_is_refused_naming_the_field(
    kubectl: Kubectl, namespace: str, crds: list[str], scheduler: str
) -> None:
    manifest = {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "LLMTrainJob",
        "metadata": {"name": "ignored"},
        "spec": {
            "nodes": 2,
            "accelerator": {"type": "nvidia", "perNode": 8},
            "topology": {"required": "rack"},
            "runPolicy": {"gangScheduler": scheduler},
        },
    }
    result = kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False)
    assert result.returncode != 0
    assert "spec.topology" in result.stderr
    assert "honoured by gangScheduler builtin" in result.stderr


def test_gang_left_to_kube_scheduler_is_admitted_only_once_bound(
    kubectl: Kubectl, jobs: Jobs, operator: Any
) -> None:
    # Four pods pinned to one 8-GPU host: kube-scheduler binds one; the job must not claim the gang.
    jobs.apply(
        "half",
        nodes=4,
        accelerator={"type": "nvidia", "perNode": 8},
        runPolicy={"gangScheduler": "none"},
        podTemplate={
            **outcome("Succeeded", "300s"),
            "spec": {"nodeSelector": {"kubernetes.io/hostname": "gpu-a-b0-r0-h0"}},
        },
    )
    pods = jobs.wait_pods(
        "half", lambda ps: len(ps) == 4 and any(p["spec"].get("nodeName") for p in ps), 60,
        "one pod bound",
    )  # fmt: skip
    assert sum(1 for p in pods if p["spec"].get("nodeName")) == 1
    admitted = jobs.wait_condition("half", "Admitted", "False", "Queued", timeout=30)
    assert "kube-scheduler to bind" in admitted["message"]
    assert not jobs.status("half").get("accelerators")


NOT_READY = "phalanx.dev/fake-node-ready"


def _generation(pods: list[dict[str, Any]], generation: int) -> bool:
    return (
        len(pods) == 2
        and all(p["metadata"]["labels"]["phalanx.dev/generation"] == str(generation) for p in pods)
        and all(p["spec"].get("nodeName") for p in pods)
    )


def test_a_node_that_lost_a_rank_is_avoided_even_once_ready_again(
    kubectl: Kubectl, jobs: Jobs, operator: Any
) -> None:
    jobs.apply(
        "wary",
        nodes=2,
        accelerator={"type": "nvidia", "perNode": 8},
        topology={"required": "rack"},
        failurePolicy={"nodeLostGraceSeconds": 0},
        podTemplate=outcome("Succeeded", "300s"),
    )
    jobs.wait_phase("wary", "Running", timeout=60)
    lost = jobs.pods("wary")[1]["spec"]["nodeName"]
    kubectl("annotate", "node", lost, f"{NOT_READY}=false", "--overwrite")
    try:
        jobs.wait_restarts("wary", 1, timeout=60)
    finally:
        kubectl("annotate", "node", lost, f"{NOT_READY}-", check=False)

    def ready() -> bool:
        conditions = kubectl.json("get", "node", lost)["status"]["conditions"]
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    wait_for(ready, 30, f"{lost} Ready again")
    second = jobs.wait_pods("wary", lambda ps: _generation(ps, 2), 90, "the second gang bound")
    assert lost not in {p["spec"]["nodeName"] for p in second}
    assert jobs.status("wary")["avoidedNodes"] == [lost]
    # A later gang of the same job keeps off it as well, though the node is healthy now.
    jobs.annotate_pod(
        "wary-0",
        **{"phalanx.dev/fake-outcome": "Failed", "phalanx.dev/fake-duration": "0s"},
    )
    third = jobs.wait_pods("wary", lambda ps: _generation(ps, 3), 90, "the third gang bound")
    assert lost not in {p["spec"]["nodeName"] for p in third}
