"""LLMTrainJobs through the operator on real kubelet nodes, with the real trainer image.

Every job here is a 2-node gloo gang of the `nano` preset on CPU: one pod per real node,
torchrun rendezvous through rank 0's headless DNS name, checkpoints on a claim that the dev
cluster's provisioner made, progress read from the real trainer by the operator.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from realkit import RealCluster, claim_name, job, train_log, trainjob, wait_phase

from phalanx.devcluster.testing import wait_for

STEPS = 40


def test_a_two_node_gloo_gang_trains_for_real(real_cluster: RealCluster, namespace: str) -> None:
    kubectl = real_cluster.kubectl
    kubectl.create(namespace, trainjob("nano", exportEvery=20))

    running = wait_phase(real_cluster, namespace, "nano", "Running", 300)
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", "phalanx.dev/job=nano")["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["real-1", "real-2"]
    assert running["status"]["placement"]

    # Progress in `kubectl get`, read by the operator from the real trainer's /progress.
    def reported_progress() -> str | None:
        printed = kubectl("get", "ltj", "nano", "-n", namespace, "--no-headers").stdout
        status = job(kubectl, namespace, "nano").get("status", {})
        step = (status.get("progress") or {}).get("step") or 0
        return printed if step > 0 and "/" + str(STEPS) in printed else None

    printed = wait_for(
        reported_progress, 240, "the PROGRESS column to show the trainer's step", interval=1
    )
    assert f"/{STEPS}" in printed

    done = wait_phase(real_cluster, namespace, "nano", "Succeeded", 600)
    status = done["status"]
    volume = real_cluster.volume_dir(namespace, claim_name(kubectl, namespace, "nano"))
    log = train_log(volume)
    assert log[-1]["step"] == STEPS
    assert log[-1]["loss"] < log[0]["loss"], "the loss did not fall"
    assert status["progress"]["step"] == STEPS
    assert status["progress"]["tokensPerSecond"] > 0
    checkpoints = sorted(p.name for p in volume.glob("step-*") if (p / "COMPLETE").exists())
    assert f"step-{STEPS}" in checkpoints
    # Exports are what the trainer reported, and they are really on the claim.
    assert status["exportPath"] == "export"
    assert (volume / "export" / "COMPLETE").exists()
    assert (volume / "export" / "model.safetensors").exists()
    on_claim = sorted(
        int(p.name.split("-")[1])
        for p in (volume / "exports").glob("step-*")
        if (p / "COMPLETE").exists()
    )
    assert status["exportSteps"] == on_claim
    assert 20 in on_claim


def _container_pids(pod: dict[str, Any]) -> list[int]:
    """Processes of the pod's trainer container on this machine, found through its cgroup
    (the sandbox's pause process is left alone: this is a container dying, not the pod)."""
    uid = pod["metadata"]["uid"]
    (status,) = pod["status"]["containerStatuses"]
    container = status["containerID"].split("://", 1)[1]
    pids: set[int] = set()
    for procs in Path("/sys/fs/cgroup/memory").rglob("cgroup.procs"):
        if f"pod{uid}" in str(procs) and container in str(procs):
            pids.update(int(p) for p in procs.read_text().split())
    assert pids, f"no processes of container {container} found"
    return sorted(pids)


def test_a_killed_rank_restarts_the_gang_and_resumes_from_the_claim(
    real_cluster: RealCluster, namespace: str
) -> None:
    kubectl = real_cluster.kubectl
    kubectl.create(namespace, trainjob("resume"))
    wait_phase(real_cluster, namespace, "resume", "Running", 300)
    volume = real_cluster.volume_dir(namespace, claim_name(kubectl, namespace, "resume"))

    def checkpointed() -> bool:
        return any((p / "COMPLETE").exists() for p in volume.glob("step-*"))

    wait_for(checkpointed, 300, "a complete checkpoint on the claim", interval=0.5)
    rank1 = kubectl.json("get", "pod", "resume-1", "-n", namespace)
    killed_at = time.monotonic()
    for pid in _container_pids(rank1):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def regenerated() -> dict[str, Any] | None:
        status = job(kubectl, namespace, "resume").get("status", {})
        return (
            status if status.get("restarts", 0) >= 1 and status.get("phase") == "Running" else None
        )

    status = wait_for(regenerated, 300, "the gang to restart", interval=0.5)
    assert status["restarts"] == 1
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", "phalanx.dev/job=resume")["items"]
    generations = {p["metadata"]["labels"]["phalanx.dev/generation"] for p in pods}
    assert generations == {"2"}, generations
    restarted_in = time.monotonic() - killed_at

    done = wait_phase(real_cluster, namespace, "resume", "Succeeded", 600)
    log = train_log(volume)
    assert log[-1]["step"] == STEPS
    # The uninterrupted reference: the same job, fresh, in the same namespace.
    kubectl.create(namespace, trainjob("reference"))
    wait_phase(real_cluster, namespace, "reference", "Succeeded", 600)
    reference = train_log(
        real_cluster.volume_dir(namespace, claim_name(kubectl, namespace, "reference"))
    )
    assert log[-1]["loss"] == reference[-1]["loss"], (log[-1], reference[-1])
    assert done["status"]["restarts"] == 1
    print(f"gang restart (rank killed -> generation 2 Running): {restarted_in:.1f}s")


def test_the_trainers_own_exit_code_reaches_the_failure_rules(
    real_cluster: RealCluster, namespace: str
) -> None:
    kubectl = real_cluster.kubectl
    manifest = trainjob("baddata", data="no-such-shards")
    manifest["spec"]["failurePolicy"] = {"maxRestarts": 3}
    kubectl.create(namespace, manifest)

    failed = wait_phase(real_cluster, namespace, "baddata", "Failed", 300)
    status = failed["status"]
    assert status.get("restarts", 0) == 0, "a permanent error must not restart the gang"
    messages = " ".join(c.get("message", "") for c in status.get("conditions", []))
    assert "DataError" in messages or "no-such-shards" in messages, status["conditions"]


def test_an_explicit_rule_on_the_trainers_exit_code_fails_the_job(
    real_cluster: RealCluster, namespace: str
) -> None:
    kubectl = real_cluster.kubectl
    manifest = trainjob("rule", extraArgs=["--no-such-flag"])
    manifest["spec"]["failurePolicy"] = {
        "maxRestarts": 3,
        "rules": [{"action": "FailJob", "onExitCodes": [2]}],
    }
    kubectl.create(namespace, manifest)
    failed = wait_phase(real_cluster, namespace, "rule", "Failed", 300)
    assert failed["status"].get("restarts", 0) == 0
