"""Goodput, hangs, stragglers and queue estimates on the real control plane: every rank's
/progress is served by a stand-in HTTP server on its fake pod's address (inside the cluster's
network namespace, where the test runs), the operator polls them all, and the job's status,
events and metrics follow."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from jobkit import GPU_NODE, Jobs, outcome

from phalanx import metrics
from phalanx.devcluster.testing import Kubectl, wait_for


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "1")


@pytest.fixture
def jobs(kubectl: Kubectl, namespace: str) -> Jobs:
    return Jobs(kubectl, namespace)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Rank:
    """One rank's /progress: its step moves by one every `step_seconds` until frozen."""

    def __init__(self, rank: int, address: str, port: int, step_seconds: float = 0.2) -> None:
        self.rank, self.step_seconds = rank, step_seconds
        self.started = time.monotonic()
        self.frozen_at: int | None = None
        self.eta_seconds: float | None = None
        self.checkpoint_every: int | None = None
        rank_state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(rank_state.report()).encode()
                self.send_response(200 if self.path == "/progress" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((address, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def step(self) -> int:
        if self.frozen_at is not None:
            return self.frozen_at
        return int((time.monotonic() - self.started) / self.step_seconds)

    def report(self) -> dict[str, Any]:
        step = self.step()
        return {
            "step": step,
            "totalSteps": 100_000,
            "loss": 3.0,
            "stepSeconds": self.step_seconds,
            "lastCheckpointStep": step // every * every if (every := self.checkpoint_every) else 0,
            "etaSeconds": self.eta_seconds,
            "rank": self.rank,
        }

    def freeze(self, step: int) -> None:
        self.frozen_at = step

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ranks() -> Iterator[Callable[..., list[Rank]]]:
    """Start one stand-in per pod of a running job (processesPerNode 1)."""
    started: list[Rank] = []

    def serve(pods: list[dict[str, Any]], port: int, seconds: dict[int, float]) -> list[Rank]:
        for pod in pods:
            rank = int(pod["metadata"]["labels"]["phalanx.dev/rank"])
            address = pod["status"]["podIP"]
            started.append(Rank(rank, address, port, seconds.get(rank, 0.2)))
        return list(started)

    yield serve
    for rank in started:
        rank.stop()


def running_pods(jobs: Jobs, name: str, count: int) -> list[dict[str, Any]]:
    return jobs.wait_pods(
        name,
        lambda pods: len(pods) == count and all((p.get("status") or {}).get("podIP") for p in pods),
        60,
        "pod addresses",
    )


def test_a_hung_gang_restarts_with_reason_hang_naming_the_silent_rank(
    jobs: Jobs, run_operator: Callable[..., Any], ranks: Callable[..., list[Rank]]
) -> None:
    port = free_port()
    with run_operator():
        jobs.apply(
            "hung",
            nodes=2,
            processesPerNode=1,
            accelerator=GPU_NODE,
            trainer={"metricsPort": port},
            failurePolicy={"hangTimeoutSeconds": 10},
            podTemplate=outcome("Succeeded", "600s"),
        )
        jobs.wait_phase("hung", "Running", timeout=60)
        served = ranks(running_pods(jobs, "hung", 2), port, {})
        training = wait_for(
            lambda: (
                (g := jobs.status("hung").get("goodput") or {}).get("state") == "Training" and g
            ),
            30,
            "the gang training in status.goodput",
        )
        assert training["generation"] == 1
        # Every rank stops at one step (blocked in a collective), and rank 1 goes silent.
        frozen = max(rank.step() for rank in served)
        for rank in served:
            rank.freeze(frozen)
        served[1].stop()
        stalled_from = time.monotonic()
        status = jobs.wait_restarts("hung", 1, timeout=60)
        detected_after = time.monotonic() - stalled_from
        messages = wait_for(lambda: jobs.events("hung", "Hang"), 30, "a Hang event")
    assert "silent ranks 1 (pod hung-1 on node " in messages[0]
    assert f"the step stayed at {frozen} " in messages[0]
    assert "failurePolicy.hangTimeoutSeconds 10s" in messages[0]
    # Detected after the timeout, within a few polls of it.
    assert detected_after >= 10 - 1
    assert status["gangGeneration"] == 2
    goodput = status["goodput"]
    assert goodput["state"] == "Restarting"
    assert goodput["lostSteps"] >= 1  # everything since checkpoint 0
    assert goodput["lostSeconds"] > 0


def test_a_slow_rank_is_named_a_straggler_with_its_node_in_condition_event_and_metric(
    jobs: Jobs,
    namespace: str,
    run_operator: Callable[..., Any],
    ranks: Callable[..., list[Rank]],
) -> None:
    port = free_port()
    with run_operator():
        jobs.apply(
            "slow",
            nodes=4,
            processesPerNode=1,
            accelerator=GPU_NODE,
            trainer={"metricsPort": port},
            failurePolicy={"stragglers": {"factor": 1.5, "windowSeconds": 10}},
            podTemplate=outcome("Succeeded", "600s"),
        )
        jobs.wait_phase("slow", "Running", timeout=60)
        pods = running_pods(jobs, "slow", 4)
        ranks(pods, port, {2: 0.4})  # rank 2 at half the others' pace
        condition = jobs.wait_condition("slow", "Straggling", "True", "StragglerDetected", 60)
        events = wait_for(lambda: jobs.events("slow", "StragglerDetected"), 30, "an event")
        status = jobs.status("slow")
        labels = {"llmtrainjob_namespace": namespace, "llmtrainjob": "slow"}
        stragglers = metrics.REGISTRY.get_sample_value("phalanx_trainjob_stragglers", labels)
        ettr = metrics.REGISTRY.get_sample_value("phalanx_trainjob_ettr", labels)
    node = next(p["spec"]["nodeName"] for p in pods if p["metadata"]["name"] == "slow-2")
    assert f"rank 2 (pod slow-2 on node {node}) takes 0.4s per step, 2.0x" in condition["message"]
    assert node in events[0]
    assert [(s["rank"], s["node"]) for s in status["stragglers"]] == [(2, node)]
    assert stragglers == 1.0
    assert ettr is not None
    assert status["phase"] == "Running", "Report only: the gang keeps running"


def test_a_queued_job_says_its_position_and_when_it_should_start(
    kubectl: Kubectl,
    jobs: Jobs,
    namespace: str,
    run_operator: Callable[..., Any],
    ranks: Callable[..., list[Rank]],
) -> None:
    """Two whole-rack jobs confined to one rack: the second waits, and its status says where
    it stands and when the first, whose rank 0 reports an ETA, lets it in."""
    rack = kubectl.json("get", "nodes")["items"][0]["metadata"]["labels"]["phalanx.dev/rack"]
    confined = {"spec": {"nodeSelector": {"phalanx.dev/rack": rack}}}
    port = free_port()
    with run_operator():
        jobs.apply(
            "first",
            nodes=4,
            processesPerNode=1,
            accelerator=GPU_NODE,
            trainer={"metricsPort": port},
            podTemplate={**outcome("Succeeded", "600s"), **confined},
        )
        jobs.wait_phase("first", "Running", timeout=60)
        served = ranks(running_pods(jobs, "first", 4), port, {})
        eta = 600.0
        for rank in served:
            rank.eta_seconds = eta
        wait_for(
            lambda: (jobs.status("first").get("progress") or {}).get("etaSeconds") == eta,
            30,
            "the first job's ETA in its status",
        )
        asked = time.time()
        jobs.apply(
            "second",
            nodes=4,
            processesPerNode=1,
            accelerator=GPU_NODE,
            podTemplate={**outcome("Succeeded", "60s"), **confined},
        )
        queue = wait_for(
            lambda: (q := jobs.status("second").get("queue") or {}).get("estimatedStartTime") and q,
            60,
            "status.queue of the waiting job",
        )
        admitted = jobs.condition("second", "Admitted")
        wide = kubectl("get", "ltj", "second", "-n", namespace, "-o", "wide").stdout
    assert queue["position"] == 1
    assert queue["after"] == f"{namespace}/first"
    start = datetime.fromisoformat(queue["estimatedStartTime"].replace("Z", "+00:00"))
    assert abs(start.timestamp() - (asked + eta)) < 30
    assert admitted is not None
    assert admitted["status"] == "False"
    assert "Position 1 in the admission queue; estimated start in ~10m" in admitted["message"]
    assert f"when {namespace}/first finishes" in admitted["message"]
    assert queue["estimatedStartTime"] in wide


def test_replace_moves_the_gang_off_a_stragglers_node_at_the_next_checkpoint(
    jobs: Jobs, run_operator: Callable[..., Any], ranks: Callable[..., list[Rank]]
) -> None:
    port = free_port()
    with run_operator():
        jobs.apply(
            "moved",
            nodes=4,
            processesPerNode=1,
            accelerator=GPU_NODE,
            trainer={"metricsPort": port},
            failurePolicy={"stragglers": {"windowSeconds": 10, "action": "Replace"}},
            podTemplate=outcome("Succeeded", "600s"),
        )
        jobs.wait_phase("moved", "Running", timeout=60)
        pods = running_pods(jobs, "moved", 4)
        served = ranks(pods, port, {2: 0.4})
        slow_node = next(p["spec"]["nodeName"] for p in pods if p["metadata"]["name"] == "moved-2")
        # No checkpoint yet: the straggler is found, its node avoided, and the gang trains on.
        found = wait_for(
            lambda: (s := jobs.status("moved")).get("stragglers") and s, 60, "the straggler"
        )
        assert found["avoidedNodes"] == [slow_node]
        assert found["restarts"] == 0, "the gang trains on until its next checkpoint"
        for rank in served:
            rank.checkpoint_every = 50  # from now, rank 0 checkpoints every 10 s
        status = jobs.wait_restarts("moved", 1, timeout=60)
        events = wait_for(lambda: jobs.events("moved", "StragglerReplaced"), 30, "an event")
        new = jobs.wait_pods(
            "moved",
            lambda pods: (
                len(pods) == 4
                and all(p["metadata"]["labels"]["phalanx.dev/generation"] == "2" for p in pods)
                and all(p["spec"].get("nodeName") for p in pods)
            ),
            60,
            "the new gang bound",
        )
    assert "Straggler replaced at checkpoint" in events[0]
    assert f"on node {slow_node}" in events[0]
    assert status["avoidedNodes"] == [slow_node]
    assert slow_node not in {p["spec"]["nodeName"] for p in new}
