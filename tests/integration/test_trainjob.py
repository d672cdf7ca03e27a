"""LLMTrainJob scenarios on the real control plane with the operator under KopfRunner.

The dev cluster has 64 fake H100 nodes: 2 zones x 2 blocks x 4 racks x 4 hosts of 8 GPUs.
kwok plays the kubelet: pods turn Running when bound, and end as their fake-outcome annotation
says. Each scenario is its own test in a fresh namespace.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from jobkit import BAD_AFFINITY, GPU_NODE, Jobs, env, gated, node_labels, outcome

from phalanx.devcluster.profiles import get_profile, render_nodes
from phalanx.devcluster.testing import Kubectl, wait_for

NOT_READY = "phalanx.dev/fake-node-ready"


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")


@pytest.fixture
def jobs(kubectl: Kubectl, namespace: str) -> Jobs:
    return Jobs(kubectl, namespace)


@pytest.fixture
def operator(run_operator: Callable[..., Any]) -> Iterator[Any]:
    with run_operator() as runner:
        yield runner


def racks_of(kubectl: Kubectl, pods: list[dict[str, Any]]) -> set[str]:
    return {node_labels(kubectl, p["spec"]["nodeName"])["phalanx.dev/rack"] for p in pods}


def bound(pods: list[dict[str, Any]]) -> bool:
    return all(p["spec"].get("nodeName") for p in pods)


def test_four_node_job_lands_in_one_rack_with_env_service_and_claim(
    kubectl: Kubectl, namespace: str, jobs: Jobs, operator: Any
) -> None:
    kubectl(
        "create", "-f", "-",
        stdin=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"pv-{namespace}"},
            "spec": {
                "capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"],
                "hostPath": {"path": "/tmp/phalanx-pv"},
                "claimRef": {"namespace": namespace, "name": "gpt-checkpoint"},
            },
        }),
    )  # fmt: skip
    try:
        jobs.apply(
            "gpt",
            nodes=4,
            accelerator=GPU_NODE,
            topology={"required": "rack"},
            checkpoint={"size": "10Gi"},
        )
        status = jobs.wait_phase("gpt", "Running", timeout=90)
        pods = jobs.pods("gpt")
        assert len(pods) == 4
        assert racks_of(kubectl, pods) == {status["placement"]["domain"]}
        assert status["placement"]["level"] in ("rack", "host")
        assert [p["spec"]["nodeName"] for p in pods] == status["placement"]["nodes"]
        assert status["accelerators"] == 32
        for rank, pod in enumerate(pods):
            variables = env(pod)
            assert variables["PET_NODE_RANK"] == str(rank)
            assert variables["PET_NNODES"] == "4"
            assert variables["PET_MASTER_ADDR"] == f"gpt-0.gpt.{namespace}.svc"
            assert not gated(pod)
        service = kubectl.json("get", "service", "gpt", "-n", namespace)
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        claim = kubectl.json("get", "pvc", "gpt-checkpoint", "-n", namespace)
        assert claim["status"]["phase"] == "Bound"
        printed = kubectl("get", "ltj", "gpt", "-n", namespace).stdout
        assert "Running" in printed
        assert status["placement"]["domain"] in printed
    finally:
        kubectl("delete", "pv", f"pv-{namespace}", "--wait=false", check=False)


def test_competing_gangs_one_runs_the_other_waits_never_partially(
    namespace: str, jobs: Jobs, operator: Any
) -> None:
    # 40 of the 64 nodes each: only one gang fits at a time.
    jobs.apply(
        "first",
        nodes=40,
        accelerator=GPU_NODE,
        podTemplate=outcome("Succeeded", "8s"),
        runPolicy={"priority": 10},
    )
    jobs.wait_phase("first", "Running", timeout=90)
    jobs.apply("second", nodes=40, accelerator=GPU_NODE, podTemplate=outcome("Succeeded", "2s"))
    waiting = jobs.wait_condition("second", "Admitted", "False", "InsufficientCapacity", timeout=60)
    assert "40" in waiting["message"]

    def second_all_or_nothing() -> bool:
        pods = jobs.pods("second")
        states = {gated(p) for p in pods}
        assert len(states) <= 1, "the second gang was partially released"
        return jobs.status("second").get("phase") == "Succeeded"

    wait_for(second_all_or_nothing, 120, "the second gang to run after the first finished")
    assert jobs.status("first")["phase"] == "Succeeded"


def test_rank_failure_restarts_the_gang_then_succeeds(jobs: Jobs, operator: Any) -> None:
    jobs.apply("flaky", nodes=2, accelerator=GPU_NODE, podTemplate=outcome("Succeeded", "12s"))
    jobs.wait_phase("flaky", "Running", timeout=60)
    jobs.annotate_pod(
        "flaky-1",
        **{
            "phalanx.dev/fake-outcome": "Failed",
            "phalanx.dev/fake-exit-code": "3",
            "phalanx.dev/fake-duration": "0s",
        },
    )
    jobs.wait_restarts("flaky", 1, timeout=60)
    messages = wait_for(lambda: jobs.events("flaky", "RankFailed"), 30, "a RankFailed event")
    assert "rank 1" in messages[0]
    assert "exit code 3" in messages[0]
    jobs.wait_pods(
        "flaky",
        lambda pods: (
            all(p["metadata"]["labels"]["phalanx.dev/generation"] == "2" for p in pods)
            and len(pods) == 2
        ),
        60,
        "generation 2 pods",
    )
    status = jobs.wait_phase("flaky", "Succeeded", timeout=90)
    assert status["restarts"] == 1
    assert status["gangGeneration"] == 2
    assert {env(p)["PHALANX_RESTART"] for p in jobs.pods("flaky")} == {"1"}


def test_too_many_failures_fail_the_job(jobs: Jobs, operator: Any) -> None:
    jobs.apply(
        "doomed",
        nodes=2,
        accelerator=GPU_NODE,
        podTemplate=outcome("Failed", "1s", exit_code=1),
        failurePolicy={"maxRestarts": 1},
    )
    status = jobs.wait_phase("doomed", "Failed", timeout=90)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "RestartLimitExceeded"
    assert status["restarts"] == 1


def test_permanent_exit_code_fails_at_once(jobs: Jobs, operator: Any) -> None:
    jobs.apply(
        "bad-data",
        nodes=2,
        accelerator=GPU_NODE,
        podTemplate=outcome("Failed", "1s", exit_code=2),
        failurePolicy={"maxRestarts": 5, "rules": [{"action": "FailJob", "onExitCodes": [2]}]},
    )
    status = jobs.wait_phase("bad-data", "Failed", timeout=60)
    assert status["restarts"] == 0
    assert (
        next(c for c in status["conditions"] if c["type"] == "Failed")["reason"]
        == "PermanentFailure"
    )


def test_trainers_classified_failure_fails_at_once_quoting_its_message(
    jobs: Jobs, operator: Any
) -> None:
    # torchrun exits 1; the trainer's termination message says what really happened.
    report = {"exitCode": 2, "reason": "InvalidConfig", "message": "unknown preset 'nanoo'"}
    jobs.apply(
        "typo",
        nodes=2,
        accelerator=GPU_NODE,
        podTemplate=outcome("Failed", "1s", exit_code=1, report=report),
        failurePolicy={"maxRestarts": 5},
    )
    status = jobs.wait_phase("typo", "Failed", timeout=60)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentFailure"
    assert "exit code 2 (InvalidConfig)" in failed["message"]
    assert "unknown preset 'nanoo'" in failed["message"]
    assert status["restarts"] == 0
    container = jobs.pods("typo")[0]["spec"]["containers"][0]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert env(jobs.pods("typo")[0])["PHALANX_TERMINATION_LOG"] == "/dev/termination-log"


def test_export_is_what_rank_zero_reported_never_assumed(jobs: Jobs, operator: Any) -> None:
    done = {"exitCode": 0, "reason": "Completed", "message": "trained", "exportPath": "export"}
    jobs.apply(
        "reported",
        nodes=1,
        accelerator=GPU_NODE,
        podTemplate=outcome("Succeeded", "1s", report={**done, "exportSteps": [100, 200]}),
    )
    jobs.apply("silent", nodes=1, accelerator=GPU_NODE, podTemplate=outcome("Succeeded", "1s"))
    reported = jobs.wait_phase("reported", "Succeeded", timeout=60)
    assert (reported["exportPath"], reported["exportSteps"]) == ("export", [100, 200])
    silent = jobs.wait_phase("silent", "Succeeded", timeout=60)
    assert "exportPath" not in silent
    assert not silent.get("exportSteps")


def creates() -> float:
    """Pod creates this process's operators have sent so far."""
    from phalanx import metrics

    labels = {"verb": "create", "resource": "pod"}
    return metrics.REGISTRY.get_sample_value("phalanx_api_requests_total", labels) or 0.0


def test_pod_template_the_api_server_rejects_is_reported_and_backed_off(
    jobs: Jobs, operator: Any
) -> None:
    jobs.apply(
        "invalid",
        nodes=2,
        accelerator=GPU_NODE,
        podTemplate={"spec": {"affinity": BAD_AFFINITY}},
    )
    rejected = jobs.wait_condition("invalid", "Admitted", "False", "PodCreateRejected", timeout=60)
    assert "nodeAffinity" in rejected["message"]
    assert "HTTP 422" in rejected["message"]
    assert "attempt 1," in rejected["message"]
    # Each report names the next attempt; between two reports exactly one attempt (two pod
    # creates) happens, and never before the time the previous report announced.
    for attempt in (2, 3):
        announced = _next_attempt(rejected["message"])
        before = creates()

        def reported(attempt: int = attempt) -> dict[str, Any] | None:
            found = jobs.condition("invalid", "Admitted")
            return found if found and f"attempt {attempt}," in found["message"] else None

        rejected = wait_for(reported, 60, f"attempt {attempt} to be reported")
        assert creates() - before == 2, "one attempt of two pods per backoff step"
        assert datetime.now(UTC) >= announced
    assert jobs.pods("invalid") == []


def test_a_running_job_whose_namespace_is_deleted_is_not_created_again_and_again(
    jobs: Jobs, kubectl: Kubectl, operator: Any
) -> None:
    # The namespace controller deletes the pods before (or while) it deletes the job: the
    # operator may restart the gang once, but creates into a terminating namespace change
    # nothing and must not be repeated in a loop until the job is gone.
    jobs.apply("doomed", nodes=2, accelerator=GPU_NODE)
    jobs.wait_phase("doomed", "Running", timeout=60)
    before = creates()
    kubectl("delete", "namespace", jobs.namespace, "--timeout=120s")
    assert creates() - before <= 2, "at most one new gang of two pods"


def _next_attempt(message: str) -> datetime:
    stamp = message.rsplit("next at ", 1)[1].rstrip(".")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _restarted_off(jobs: Jobs, name: str, lost: str) -> None:
    """The 2-pod gang of `name` was restarted for a lost node: a NodeLost RankFailed event, and
    the next generation bound elsewhere."""
    events = wait_for(lambda: jobs.events(name, "RankFailed"), 30, "a RankFailed event")
    assert "NodeLost" in events[0], events
    pods = jobs.wait_pods(
        name,
        lambda pods: (
            len(pods) == 2
            and bound(pods)
            and all(p["metadata"]["labels"]["phalanx.dev/generation"] == "2" for p in pods)
        ),
        120,
        "the new gang bound",
    )
    assert lost not in {p["spec"]["nodeName"] for p in pods}


def test_node_not_ready_reschedules_the_gang_on_healthy_nodes(
    kubectl: Kubectl, jobs: Jobs, operator: Any
) -> None:
    jobs.apply(
        "resilient",
        nodes=2,
        accelerator=GPU_NODE,
        topology={"required": "rack"},
        podTemplate=outcome("Succeeded", "300s"),
    )
    jobs.wait_phase("resilient", "Running", timeout=60)
    lost = jobs.pods("resilient")[1]["spec"]["nodeName"]
    kubectl("annotate", "node", lost, f"{NOT_READY}=false", "--overwrite")
    try:
        jobs.wait_restarts("resilient", 1, timeout=90)
        _restarted_off(jobs, "resilient", lost)
        jobs.wait_phase("resilient", "Running", timeout=60)
    finally:
        kubectl("annotate", "node", lost, f"{NOT_READY}-", check=False)


def test_a_no_execute_taint_restarts_the_gang_off_the_node_at_once(
    kubectl: Kubectl, jobs: Jobs, operator: Any
) -> None:
    """A health checker taints a node NoExecute (here: by hand): the gang is restarted in the
    same pass, with no grace, and never placed there again."""
    jobs.apply(
        "tainted",
        nodes=2,
        accelerator=GPU_NODE,
        podTemplate=outcome("Succeeded", "300s"),
        failurePolicy={"nodeLostGraceSeconds": 300},
    )
    jobs.wait_phase("tainted", "Running", timeout=60)
    sick = jobs.pods("tainted")[1]["spec"]["nodeName"]
    taint = "phalanx.dev/test-health=bad:NoExecute"
    kubectl("taint", "node", sick, taint)
    try:
        # Well within the 300 s grace a NotReady node would get.
        status = jobs.wait_restarts("tainted", 1, timeout=30)
        assert sick in status["avoidedNodes"], status
        _restarted_off(jobs, "tainted", sick)
    finally:
        kubectl("taint", "node", sick, f"{taint}-", check=False)


def test_suspend_and_resume(jobs: Jobs, operator: Any) -> None:
    jobs.apply("pausable", nodes=2, accelerator=GPU_NODE, podTemplate=outcome("Succeeded", "300s"))
    jobs.wait_phase("pausable", "Running", timeout=60)
    jobs.patch("pausable", {"spec": {"runPolicy": {"suspend": True}}})
    jobs.wait_phase("pausable", "Suspended", timeout=60)
    wait_for(lambda: not jobs.pods("pausable"), 60, "the pods of a suspended job to be deleted")
    jobs.patch("pausable", {"spec": {"runPolicy": {"suspend": False}}})
    status = jobs.wait_phase("pausable", "Running", timeout=60)
    assert status["gangGeneration"] == 2


def test_active_deadline(jobs: Jobs, operator: Any) -> None:
    jobs.apply(
        "slow",
        nodes=1,
        accelerator=GPU_NODE,
        podTemplate=outcome("Succeeded", "300s"),
        runPolicy={"activeDeadlineSeconds": 5},
    )
    status = jobs.wait_phase("slow", "Failed", timeout=60)
    assert (
        next(c for c in status["conditions"] if c["type"] == "Failed")["reason"]
        == "DeadlineExceeded"
    )
    wait_for(
        lambda: (
            all(
                p["metadata"].get("deletionTimestamp") or p["status"]["phase"] != "Running"
                for p in jobs.pods("slow")
            )
            or not jobs.pods("slow")
        ),
        60,
        "pods stopped",
    )


def test_ttl_deletes_a_finished_job(
    kubectl: Kubectl, namespace: str, jobs: Jobs, operator: Any
) -> None:
    jobs.apply(
        "brief",
        nodes=1,
        accelerator=GPU_NODE,
        podTemplate=outcome("Succeeded", "1s"),
        runPolicy={"ttlSecondsAfterFinished": 2},
    )
    jobs.wait_phase("brief", "Succeeded", timeout=60)
    wait_for(
        lambda: not kubectl.exists("llmtrainjob", "brief", "-n", namespace),
        60,
        "the job to be deleted by its TTL",
    )


def test_impossible_required_level_gets_a_clear_reason_and_binds_nothing(
    jobs: Jobs, operator: Any
) -> None:
    # A rack has 4 hosts: 5 pods of 8 GPUs can never share one.
    jobs.apply("too-wide", nodes=5, accelerator=GPU_NODE, topology={"required": "rack"})
    condition = jobs.wait_condition(
        "too-wide", "Admitted", "False", "GangExceedsDomainCapacity", timeout=60
    )
    assert "rack" in condition["message"]
    assert "never" in condition["message"]
    assert all(gated(p) and not p["spec"].get("nodeName") for p in jobs.pods("too-wide"))


def test_unknown_topology_level_is_reported(jobs: Jobs, operator: Any) -> None:
    jobs.apply("odd-level", nodes=1, accelerator=GPU_NODE, topology={"required": "pod"})
    condition = jobs.wait_condition(
        "odd-level", "Admitted", "False", "UnknownTopologyLevel", timeout=60
    )
    assert "pod" in condition["message"]


def test_ascend_job_gets_a_completed_rank_table(
    kubectl: Kubectl, namespace: str, jobs: Jobs, operator: Any
) -> None:
    nodes = render_nodes(get_profile("ascend"), 2)
    for node in nodes:
        kubectl("apply", "-f", "-", stdin=json.dumps(node))
    jobs.apply(
        "npu",
        nodes=2,
        accelerator={"type": "ascend", "perNode": 8},
        podTemplate=outcome("Succeeded", "300s"),
    )
    pods = jobs.wait_pods(
        "npu", lambda pods: len(pods) == 2 and bound(pods), 60, "both NPU pods bound"
    )
    table = json.loads(
        kubectl.json("get", "configmap", "npu-hccl", "-n", namespace)["data"]["hccl.json"]
    )
    assert table["status"] == "initializing"
    # Play the Ascend device plugin: annotate each bound pod with its NPUs.
    for index, pod in enumerate(pods):
        devices = [{"device_id": str(i), "device_ip": f"192.168.{index}.{i}"} for i in range(8)]
        annotation = json.dumps(
            {"pod_name": pod["metadata"]["name"], "server_id": f"s{index}", "devices": devices}
        )
        jobs.annotate_pod(
            pod["metadata"]["name"],
            **{"ascend.kubectl.kubernetes.io/ascend-910-configuration": annotation},
        )

    def completed() -> dict[str, Any] | None:
        data = json.loads(
            kubectl.json("get", "configmap", "npu-hccl", "-n", namespace)["data"]["hccl.json"]
        )
        return data if data["status"] == "completed" else None

    table = wait_for(completed, 60, "hccl.json to be completed")
    rank_ids = [d["rank_id"] for server in table["server_list"] for d in server["device"]]
    assert rank_ids == [str(i) for i in range(16)]
    assert env(pods[0])["RANK_TABLE_FILE"] == "/etc/phalanx/hccl/hccl.json"


def test_gang_scheduler_none_uses_plain_kube_scheduler(jobs: Jobs, operator: Any) -> None:
    jobs.apply(
        "plain",
        nodes=2,
        accelerator=GPU_NODE,
        runPolicy={"gangScheduler": "none"},
        podTemplate=outcome("Succeeded", "2s"),
    )
    pods = jobs.wait_pods(
        "plain", lambda pods: len(pods) == 2 and bound(pods), 60, "pods bound by kube-scheduler"
    )
    assert not any(gated(p) for p in pods)
    jobs.wait_phase("plain", "Succeeded", timeout=60)


def test_operator_restart_mid_admission_no_duplicates_no_double_booking(
    kubectl: Kubectl, namespace: str, jobs: Jobs, run_operator: Callable[..., Any]
) -> None:
    names = [f"burst-{i}" for i in range(6)]
    with run_operator():
        for name in names:
            jobs.apply(
                name, nodes=4, accelerator=GPU_NODE, podTemplate=outcome("Succeeded", "300s")
            )
        wait_for(
            lambda: any(not gated(p) for n in names for p in jobs.pods(n)), 60, "admission to begin"
        )
    # The operator is gone mid-flight; a new one must finish the work without duplicating it.
    with run_operator():
        for name in names:
            jobs.wait_phase(name, "Running", timeout=90)
    pods = kubectl.json("get", "pods", "-n", namespace)["items"]
    assert len(pods) == 4 * len(names)
    per_node: dict[str, int] = {}
    for pod in pods:
        node = pod["spec"]["nodeName"]
        per_node[node] = per_node.get(node, 0) + int(
            pod["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
        )
    assert max(per_node.values()) <= 8, per_node


def test_progress_from_rank_zero_shows_in_status_and_kubectl_get(
    kubectl: Kubectl,
    namespace: str,
    jobs: Jobs,
    run_operator: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank 0's /progress (served here on the fake pod's loopback address) reaches the status."""
    import http.server
    import socket
    import threading

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    report = {
        "step": 120,
        "totalSteps": 400,
        "loss": 2.71828,
        "tokensPerSecond": 51200.0,
        "mfu": None,
        "lastCheckpointStep": 100,
        "etaSeconds": 33.0,
    }

    class Progress(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(report).encode()
            self.send_response(200 if self.path == "/progress" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "1")
    with run_operator():
        jobs.apply(
            "watched",
            nodes=1,
            accelerator=GPU_NODE,
            trainer={"metricsPort": port},
            podTemplate=outcome("Succeeded", "300s"),
        )
        jobs.wait_phase("watched", "Running", timeout=60)
        address = jobs.pods("watched")[0]["status"]["podIP"]
        server = http.server.ThreadingHTTPServer((address, port), Progress)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            status = wait_for(
                lambda: (s := jobs.status("watched")).get("progress", {}).get("step") == 120 and s,
                30,
                "progress in the status",
            )
        finally:
            server.shutdown()
    assert status["progress"]["percent"] == "120/400 30%"
    assert status["progress"]["loss"] == pytest.approx(2.7183)
    assert status["progress"]["lastCheckpointStep"] == 100
    printed = kubectl("get", "ltj", "watched", "-n", namespace).stdout
    assert "120/400 30%" in printed
    assert "2.7183" in printed


def test_a_child_service_or_claim_deleted_by_hand_comes_back(
    kubectl: Kubectl, namespace: str, jobs: Jobs, operator: Any
) -> None:
    # Suspended: no pod uses the claim, so deleting it is not held up by claim protection.
    jobs.apply(
        "kept",
        nodes=2,
        accelerator=GPU_NODE,
        checkpoint={"size": "1Gi"},
        runPolicy={"suspend": True},
    )

    def uid(kind: str, name: str) -> str | None:
        if not kubectl.exists(kind, name, "-n", namespace):
            return None
        found: str = kubectl.json("get", kind, name, "-n", namespace)["metadata"]["uid"]
        return found

    children = (("service", "kept"), ("pvc", "kept-checkpoint"))
    first = {
        kind: wait_for(functools.partial(uid, kind, name), 60, name) for kind, name in children
    }
    for kind, name in children:
        kubectl("delete", kind, name, "-n", namespace)
    for kind, name in children:

        def replaced(kind: str = kind, name: str = name) -> bool:
            return uid(kind, name) not in (None, first[kind])

        wait_for(replaced, 60, f"a new {kind} {name}")
    service = kubectl.json("get", "service", "kept", "-n", namespace, "--show-managed-fields")
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["kind"] == "LLMTrainJob"
    managers = {m["manager"] for m in service["metadata"]["managedFields"]}
    assert "phalanx" in managers
