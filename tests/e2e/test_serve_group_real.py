"""A two-pod InferenceService group on two real nodes is one tensor-parallel model: it answers
through its Service exactly what a single-pod service of the same model answers.

Both services serve the built-in model in float64 (so that the group's all-reduced partial sums
and the single process's full sums round alike and greedy choices cannot differ by a tie). Each
group pod asks for more than half a real node's CPUs, so the leader and the worker land on
different nodes and the group's gloo traffic crosses them.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from realkit import RealCluster, ready

from phalanx.devcluster.testing import Kubectl, wait_for

BODIES: list[dict[str, Any]] = [
    {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0},
    {"prompt": [5, 17, 300, 2, 9], "max_tokens": 24, "temperature": 0, "ignore_eos": True},
    {"prompt": "Numbers: 1, 2, 3,", "max_tokens": 12, "temperature": 0.9, "seed": 4},
    {"prompt": "import sys", "max_tokens": 6, "temperature": 0, "logprobs": 2},
]


def builtin_service(name: str, *, nodes: int, cpu: str) -> dict[str, Any]:
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": {"builtin": "tiny"},
            "replicas": 1,
            "nodesPerReplica": nodes,
            "accelerator": {"type": "cpu", "cpu": cpu, "memory": "2Gi"},
            "server": {
                "maxBatchSize": 4,
                "maxModelLen": 256,
                "servedModelName": "tiny",
                "extraArgs": ["--dtype", "float64", "--threads", "1"],
            },
        },
    }


def answers(port: int) -> list[dict[str, Any]]:
    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=120) as client:
        for body in BODIES:
            r = client.post("/completions", json={"model": "tiny", **body})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            out.append(
                {
                    "text": choice["text"],
                    "finish_reason": choice["finish_reason"],
                    "logprobs": (choice["logprobs"] or {}).get("token_logprobs"),
                }
            )
    return out


def pods_of(kubectl: Kubectl, namespace: str, service: str) -> list[dict[str, Any]]:
    listed = kubectl.json(
        "get", "pods", "-n", namespace, "-l", f"phalanx.dev/inference-service={service}"
    )
    return sorted(listed["items"], key=lambda p: p["metadata"]["name"])


def test_a_two_pod_group_on_two_nodes_answers_as_one_pod(
    real_cluster: RealCluster, namespace: str, port_forward: Any
) -> None:
    kubectl = real_cluster.kubectl
    kubectl.create(namespace, builtin_service("group", nodes=2, cpu="1200m"))
    kubectl.create(namespace, builtin_service("single", nodes=1, cpu="500m"))
    for name in ("group", "single"):
        wait_for(
            lambda name=name: ready(kubectl, namespace, name),
            600,
            f"InferenceService {name} Ready",
            interval=1,
        )

    pods = pods_of(kubectl, namespace, "group")
    assert [p["metadata"]["name"] for p in pods] == ["group-0-0", "group-0-1"]
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 2, f"the group's pods share a node: {nodes}"
    # The leader joined a group of two, and the worker ran the steps it announced.
    leader_log = kubectl("logs", "-n", namespace, "group-0-0").stdout
    assert "joining group of 2" in leader_log, leader_log[-2000:]

    group = answers(port_forward(namespace, "service/group", 80))
    single = answers(port_forward(namespace, "service/single", 80))
    # Same tokens; log-probabilities agree to float64 rounding of the all-reduced sums.
    assert [(a["text"], a["finish_reason"]) for a in group] == [
        (a["text"], a["finish_reason"]) for a in single
    ]
    for a, b in zip(group, single, strict=True):
        assert a["logprobs"] == (None if b["logprobs"] is None else pytest.approx(b["logprobs"]))
    assert all(a["text"] for a in group)

    # Both group pods stay ready after serving (a broken group takes its pods down).
    assert all(
        c["ready"]
        for p in pods_of(kubectl, namespace, "group")
        for c in p["status"]["containerStatuses"]
    )
