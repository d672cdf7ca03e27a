"""InferenceService scenarios on the real control plane with the operator under KopfRunner.

kwok plays the kubelet: a bound pod is Running and Ready at once (probes are not executed),
so "ready" here means kwok's Ready. Each scenario is its own test in a fresh namespace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from jobkit import BAD_AFFINITY, GPU_1, Jobs, Services, node_labels, outcome

from phalanx.devcluster.testing import Kubectl, wait_for

SERVICE_LABEL = "phalanx.dev/inference-service"


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")
    monkeypatch.setenv("PHALANX_SCRAPE_INTERVAL", "0")


@pytest.fixture
def operator(run_operator: Callable[..., Any]) -> Iterator[Any]:
    with run_operator() as runner:
        yield runner


def ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def groups(pods: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        found.setdefault(pod["metadata"]["labels"]["phalanx.dev/group"], []).append(pod)
    return found


@pytest.fixture
def services(kubectl: Kubectl, namespace: str) -> Services:
    return Services(kubectl, namespace)


def test_replicas_become_ready_behind_a_service_and_kubectl_scale_changes_groups(
    kubectl: Kubectl, namespace: str, services: Services, operator: Any
) -> None:
    services.apply("chat", replicas=2, accelerator=GPU_1)
    status = services.wait_ready_groups("chat", 2)
    services.wait_condition("chat", "Ready", "True", "MinimumReplicasAvailable")
    assert status["url"] == f"http://chat.{namespace}.svc/v1"
    assert status["selector"] == f"{SERVICE_LABEL}=chat,phalanx.dev/worker-index=0"
    assert status["modelRevision"] == "builtin:tiny"
    client = kubectl.json("get", "service", "chat", "-n", namespace)
    assert client["spec"]["selector"] == {SERVICE_LABEL: "chat", "phalanx.dev/worker-index": "0"}
    assert kubectl.exists("service", "chat-peers", "-n", namespace)
    printed = kubectl("get", "lis", "chat", "-n", namespace).stdout
    assert "True" in printed
    assert "builtin:tiny" in printed

    kubectl("scale", "lis/chat", "--replicas=3", "-n", namespace)
    services.wait_ready_groups("chat", 3)
    assert len(groups(services.pods("chat"))) == 3
    path = f"/apis/phalanx.dev/v1alpha1/namespaces/{namespace}/inferenceservices/chat/scale"
    scale = json.loads(kubectl("get", "--raw", path).stdout)
    assert scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == status["selector"]

    kubectl("scale", "lis/chat", "--replicas=1", "-n", namespace)
    services.wait_ready_groups("chat", 1)
    wait_for(lambda: len(services.pods("chat")) == 1, 30, "scaled-down pods to be gone")


def test_spec_change_rolls_group_by_group_without_dropping_below_the_floor(
    services: Services, operator: Any
) -> None:
    services.apply(
        "roll", replicas=3, accelerator=GPU_1, rollout={"maxSurge": 1, "maxUnavailable": 0}
    )
    before = services.wait_ready_groups("roll", 3)["revision"]
    services.patch("roll", {"spec": {"server": {"maxBatchSize": 4}}})
    seen_ready: list[int] = []

    def rolled() -> bool:
        pods = services.pods("roll")
        leaders = [p for p in pods if p["metadata"]["labels"]["phalanx.dev/worker-index"] == "0"]
        seen_ready.append(sum(ready(p) for p in leaders))
        assert len(groups(pods)) <= 4, "more groups than replicas + maxSurge"
        revisions = {p["metadata"]["labels"]["phalanx.dev/revision"] for p in pods}
        return len(leaders) == 3 and all(ready(p) for p in leaders) and before not in revisions

    wait_for(rolled, 90, "every group to run the new revision", interval=0.05)
    assert min(seen_ready) >= 3, f"ready groups dropped below the floor: {seen_ready}"
    status = services.wait_ready_groups("roll", 3)
    assert status["revision"] != before
    assert status["updatedReplicas"] == 3
    services.wait_condition("roll", "Progressing", "False", "RolloutComplete")
    for pod in services.pods("roll"):
        assert pod["spec"]["containers"][0]["args"][7] == "4"


def test_two_node_group_lands_in_one_rack_and_is_recreated_whole(
    kubectl: Kubectl, services: Services, operator: Any
) -> None:
    services.apply(
        "big",
        replicas=1,
        nodesPerReplica=2,
        accelerator={"type": "nvidia", "perNode": 8},
        topology={"required": "rack"},
    )
    services.wait_ready_groups("big", 1, timeout=90)
    pods = sorted(services.pods("big"), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["name"] for p in pods] == ["big-0-0", "big-0-1"]
    racks = {node_labels(kubectl, p["spec"]["nodeName"])["phalanx.dev/rack"] for p in pods}
    assert len(racks) == 1
    leader_env = {e["name"]: e.get("value") for e in pods[1]["spec"]["containers"][0]["env"]}
    assert leader_env["PHALANX_LEADER_ADDRESS"].startswith("big-0-0.big-peers.")
    assert leader_env["PHALANX_GROUP_SIZE"] == "2"
    assert leader_env["PHALANX_WORKER_INDEX"] == "1"
    assert "phalanx.dev/placement" in pods[0]["metadata"]["annotations"]
    old_uids = {p["metadata"]["uid"] for p in pods}

    # kwok fails a running pod that carries the fake-outcome annotation.
    kubectl(
        "annotate", "pod", "big-0-1", "-n", services.namespace,
        "phalanx.dev/fake-outcome=Failed", "phalanx.dev/fake-exit-code=137",
    )  # fmt: skip

    def replaced() -> list[dict[str, Any]] | None:
        current = services.pods("big")
        fresh = [p for p in current if p["metadata"]["uid"] not in old_uids]
        if len(current) == 2 and len(fresh) == 2 and all(ready(p) for p in fresh):
            return current
        return None

    new_pods = wait_for(replaced, 90, "the whole group to be recreated")
    assert len(groups(new_pods)) == 1
    racks = {node_labels(kubectl, p["spec"]["nodeName"])["phalanx.dev/rack"] for p in new_pods}
    assert len(racks) == 1
    events = kubectl.json(
        "get", "events", "-n", services.namespace, "--field-selector", "reason=GroupRecreated"
    )
    assert events["items"], "no GroupRecreated event"


def test_from_train_job_waits_for_the_export_then_mounts_its_claim_read_only(
    kubectl: Kubectl, namespace: str, services: Services, operator: Any
) -> None:
    kubectl(
        "create", "-f", "-",
        stdin=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"pv-{namespace}"},
            "spec": {
                "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                "hostPath": {"path": "/tmp/phalanx-pv"},
                "claimRef": {"namespace": namespace, "name": "gpt-checkpoint"},
            },
        }),
    )  # fmt: skip
    try:
        services.apply("serve", model={"fromTrainJob": {"name": "gpt"}}, accelerator=GPU_1)
        services.wait_condition("serve", "Ready", "False", "TrainJobNotFound")
        jobs = Jobs(kubectl, namespace)
        jobs.apply(
            "gpt",
            nodes=1,
            accelerator=GPU_1,
            checkpoint={"size": "1Gi"},
            podTemplate=outcome(
                "Succeeded",
                "3s",
                report={"exitCode": 0, "reason": "Completed", "exportPath": "export"},
            ),
        )
        waiting = services.wait_condition("serve", "ModelLoaded", "False", "ExportNotReady")
        assert "gpt" in waiting["message"]
        assert services.pods("serve") == []
        job = jobs.wait_phase("gpt", "Succeeded", timeout=90)
        assert job["exportPath"] == "export"
        services.wait_ready_groups("serve", 1, timeout=60)
        services.wait_condition("serve", "ModelLoaded", "True", "Loaded")
        [pod] = services.pods("serve")
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "model")
        assert volume["persistentVolumeClaim"] == {"claimName": "gpt-checkpoint", "readOnly": True}
        container = pod["spec"]["containers"][0]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in container[
            "volumeMounts"
        ]
        assert container["args"][:2] == ["--model", "/models/export"]
        assert services.status("serve")["modelRevision"].startswith("gpt/export@")
    finally:
        kubectl("delete", "pv", f"pv-{namespace}", "--wait=false", check=False)


def test_bad_input_is_reported_on_ready_never_crashes(services: Services, operator: Any) -> None:
    services.apply("noclaim", model={"claim": {"name": "missing"}}, accelerator=GPU_1)
    services.apply(
        "nofit",
        nodesPerReplica=2,
        accelerator={"type": "nvidia", "perNode": 8},
        topology={"required": "host"},
    )
    missing = services.wait_condition("noclaim", "Ready", "False", "ClaimNotFound")
    assert "missing" in missing["message"]
    nofit = services.wait_condition("nofit", "Ready", "False", "GangExceedsDomainCapacity")
    assert "change the spec" in nofit["message"]
    assert all(p["spec"].get("schedulingGates") for p in services.pods("nofit"))


def test_changing_the_server_port_updates_both_services_and_a_deleted_one_comes_back(
    kubectl: Kubectl, namespace: str, services: Services, operator: Any
) -> None:
    services.apply("ported", accelerator=GPU_1)

    def ports(name: str) -> list[tuple[int, Any]] | None:
        if not kubectl.exists("service", name, "-n", namespace):
            return None
        spec = kubectl.json("get", "service", name, "-n", namespace)["spec"]
        return [(p["port"], p.get("targetPort")) for p in spec["ports"]]

    wait_for(lambda: ports("ported") == [(80, 8000)], 60, "the client Service on port 8000")
    services.patch("ported", {"spec": {"server": {"port": 8001}}})
    wait_for(lambda: ports("ported") == [(80, 8001)], 60, "the client Service to follow the port")
    wait_for(lambda: ports("ported-peers") == [(8001, 8001)], 60, "the peers Service too")
    kubectl("delete", "service", "ported", "-n", namespace)
    wait_for(lambda: ports("ported") == [(80, 8001)], 60, "the deleted client Service back")


def test_a_pod_template_the_api_server_rejects_is_reported_on_ready(
    services: Services, operator: Any
) -> None:
    services.apply("refused", accelerator=GPU_1, podTemplate={"spec": {"affinity": BAD_AFFINITY}})
    ready = services.wait_condition("refused", "Ready", "False", "PodCreateRejected")
    assert "nodeAffinity" in ready["message"]
    progressing = services.wait_condition("refused", "Progressing", "False", "PodCreateRejected")
    assert "HTTP 422" in progressing["message"]
    assert services.pods("refused") == []
