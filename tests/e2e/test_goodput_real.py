"""Goodput, hang and straggler detection with the real trainer on real kubelet nodes: every
rank's /progress is polled, a training gang shows in status.goodput, a rank frozen with
SIGSTOP (its process alive, its endpoint silent, its peer blocked in the all-reduce) is a hang
that restarts the gang with reason Hang, naming the silent rank, and a rank slowed by stopping
it for most of every 100 ms (its peers waiting for its gradients, so every rank's wall time
per step is alike) is named a straggler with its node."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from realkit import RealCluster, job, trainjob, wait_phase

from phalanx.devcluster.testing import duty_cycled, wait_for

HANG_TIMEOUT = 30


def _container_pids(pod: dict[str, Any]) -> list[int]:
    """The trainer container's processes on this machine, found through its cgroup."""
    uid = pod["metadata"]["uid"]
    (status,) = pod["status"]["containerStatuses"]
    container = status["containerID"].split("://", 1)[1]
    pids: set[int] = set()
    for procs in Path("/sys/fs/cgroup/memory").rglob("cgroup.procs"):
        if f"pod{uid}" in str(procs) and container in str(procs):
            pids.update(int(p) for p in procs.read_text().split())
    assert pids, f"no processes of container {container} found"
    return sorted(pids)


def _worker_pid(pod: dict[str, Any], local_rank: int) -> int:
    """The trainer process of one local rank of a pod (torchrun's worker, not its agent)."""
    for pid in _container_pids(pod):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"LOCAL_RANK={local_rank}".encode() in environ:
                return pid
    raise AssertionError(f"no worker of local rank {local_rank} in {pod['metadata']['name']}")


def _delete_and_wait(kubectl: Any, namespace: str, name: str) -> None:
    """Delete the job and wait its pods out: the next test needs the nodes' CPUs."""
    kubectl("delete", "llmtrainjob", name, "-n", namespace, "--wait=false", check=False)
    wait_for(
        lambda: (
            not kubectl.json("get", "pods", "-n", namespace, "-l", f"phalanx.dev/job={name}")[
                "items"
            ]
        ),
        240,
        f"the pods of job {name} to be gone",
        interval=1,
    )


STRAGGLER_WINDOW = 20


def test_a_slowed_rank_is_named_a_straggler_with_its_node(
    real_cluster: RealCluster, namespace: str
) -> None:
    kubectl = real_cluster.kubectl
    # Four ranks (two per pod): a median over at least three.
    # Means over 10 steps: one rank's share of two oversubscribed cores is noisy step by step.
    manifest = trainjob("slow", steps=100_000, extraArgs=["--log-every", "10"])
    manifest["spec"]["processesPerNode"] = 2
    manifest["spec"]["failurePolicy"]["stragglers"] = {"windowSeconds": STRAGGLER_WINDOW}
    kubectl.create(namespace, manifest)
    wait_phase(real_cluster, namespace, "slow", "Running", 300)
    wait_for(
        lambda: (
            (job(kubectl, namespace, "slow").get("status", {}).get("goodput") or {}).get("state")
            == "Training"
        ),
        300,
        "status.goodput to say Training",
        interval=1,
    )
    try:
        pod = kubectl.json("get", "pod", "slow-0", "-n", namespace)
        node = pod["spec"]["nodeName"]
        slowed_at = time.monotonic()
        # Stopped 75 ms of every 100: a quarter of its speed, far past the 1.5x bound, so the
        # noise of four ranks on two cores cannot hide it.
        with duty_cycled(_worker_pid(pod, local_rank=1), period=0.1, stopped=0.075):

            def named() -> list[dict[str, Any]] | None:
                status = job(kubectl, namespace, "slow").get("status", {})
                return status.get("stragglers") or None

            stragglers = wait_for(
                named, 6 * STRAGGLER_WINDOW + 60, "a straggler to be named", interval=1
            )
            found_in = time.monotonic() - slowed_at
        # Global rank 1: local rank 1 of pod 0. Its peers waited for it, and only it is named.
        assert [(s["rank"], s["pod"], s["node"]) for s in stragglers] == [(1, "slow-0", node)]
        assert stragglers[0]["stepSeconds"] > 1.5 * stragglers[0]["medianStepSeconds"]
        conditions = {c["type"]: c for c in job(kubectl, namespace, "slow")["status"]["conditions"]}
        assert conditions["Straggling"]["reason"] == "StragglerDetected"
        assert f"rank 1 (pod slow-0 on node {node})" in conditions["Straggling"]["message"]
        print(f"straggler named {found_in:.1f}s after the slowdown (window {STRAGGLER_WINDOW}s)")
    finally:
        _delete_and_wait(kubectl, namespace, "slow")


def test_a_frozen_rank_is_a_hang_that_restarts_the_gang(
    real_cluster: RealCluster, namespace: str
) -> None:
    kubectl = real_cluster.kubectl
    manifest = trainjob("frozen", steps=100_000, extraArgs=["--log-every", "1"])
    manifest["spec"]["failurePolicy"]["hangTimeoutSeconds"] = HANG_TIMEOUT
    kubectl.create(namespace, manifest)
    wait_phase(real_cluster, namespace, "frozen", "Running", 300)

    def training() -> dict[str, Any] | None:
        goodput = job(kubectl, namespace, "frozen").get("status", {}).get("goodput") or {}
        return goodput if goodput.get("state") == "Training" else None

    wait_for(training, 300, "status.goodput to say Training", interval=1)
    # ETTR is a live figure once the operator folded training time in (at most every 30 s).
    goodput = wait_for(
        lambda: (g := training()) and g.get("trainingSeconds", 0) > 0 and g, 120, "training time"
    )
    assert 0 < goodput["ettr"] <= 1

    rank1 = kubectl.json("get", "pod", "frozen-1", "-n", namespace)
    frozen = _container_pids(rank1)
    frozen_at = time.monotonic()
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        _assert_hang_restart(kubectl, namespace, frozen_at)
    finally:
        # A stopped process sleeps through its SIGTERM until the pod's grace period ends; let
        # it go, and free the nodes for the tests after this one.
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        _delete_and_wait(kubectl, namespace, "frozen")


def _assert_hang_restart(kubectl: Any, namespace: str, frozen_at: float) -> None:
    def restarted() -> dict[str, Any] | None:
        status = job(kubectl, namespace, "frozen").get("status", {})
        return status if status.get("restarts", 0) >= 1 else None

    status = wait_for(restarted, HANG_TIMEOUT + 120, "the hung gang to restart", interval=0.5)
    detected_in = time.monotonic() - frozen_at
    events = kubectl.json(
        "get", "events", "-n", namespace,
        "--field-selector", "involvedObject.name=frozen,reason=Hang",
    )["items"]  # fmt: skip
    assert events, "no Hang event"
    message = events[0]["message"]
    assert "silent ranks 1 (pod frozen-1 on node real-" in message, message
    assert f"failurePolicy.hangTimeoutSeconds {HANG_TIMEOUT}s" in message
    assert status["gangGeneration"] == 2
    # Everything since the step last moved was lost: at least the hang timeout.
    assert status["goodput"]["lostSeconds"] >= HANG_TIMEOUT
    assert status["goodput"]["failedAt"]
    print(f"hang detected {detected_in:.1f}s after SIGSTOP (timeout {HANG_TIMEOUT}s)")
