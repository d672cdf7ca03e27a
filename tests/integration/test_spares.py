"""Hot spares on the real control plane (PHALANX_SPARES=rack=1): a gang whose node turns
NotReady is placed again in its own rack, on the rack's spare, and the preemptible filler that
ran there meanwhile is preempted gracefully (queued again, not failed) and counted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from jobkit import Jobs, outcome

from phalanx import metrics
from phalanx.devcluster.testing import Kubectl, wait_for

RACK_LABEL = "phalanx.dev/rack"
NOT_READY = "phalanx.dev/fake-node-ready"
WHOLE_NODE = {"type": "nvidia", "perNode": 8}


@pytest.fixture(autouse=True)
def _spares(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")
    monkeypatch.setenv("PHALANX_SPARES", "rack=1")


def preempted_count() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "phalanx_spare_preemptions_total", {"kind": "LLMTrainJob"}
    )
    return value or 0.0


def test_a_gang_that_loses_a_node_is_rebound_on_its_racks_spare(
    kubectl: Kubectl, namespace: str, run_operator: Callable[..., Any]
) -> None:
    jobs = Jobs(kubectl, namespace)
    nodes = kubectl.json("get", "nodes")["items"]
    # The last rack: its four nodes are the whole world of these jobs.
    rack = sorted({n["metadata"]["labels"][RACK_LABEL] for n in nodes})[-1]
    members = sorted(
        n["metadata"]["name"] for n in nodes if n["metadata"]["labels"][RACK_LABEL] == rack
    )
    assert len(members) == 4
    in_rack = {"nodeSelector": {RACK_LABEL: rack}}
    lost: str | None = None
    before = preempted_count()
    with run_operator():
        common = {
            "accelerator": WHOLE_NODE,
            "podTemplate": {**outcome("Succeeded", "600s"), "spec": in_rack},
        }
        jobs.apply(
            "train", nodes=3, topology={"required": "rack"},
            failurePolicy={"nodeLostGraceSeconds": 0}, **common,
        )  # fmt: skip
        jobs.wait_phase("train", "Running", timeout=60)
        placed = jobs.status("train")["placement"]
        assert placed["domain"] == rack
        spare = (set(members) - set(placed["nodes"])).pop()
        # An ordinary gang may not take the rack's last node; a preemptible one may.
        jobs.apply("ordinary", nodes=1, **common)
        jobs.apply("filler", nodes=1, runPolicy={"preemptible": True}, **common)
        jobs.wait_phase("filler", "Running", timeout=60)
        assert jobs.status("filler")["placement"]["nodes"] == [spare]
        queued = jobs.wait_condition(
            "ordinary", "Admitted", "False", "InsufficientCapacity", timeout=30
        )
        assert "kept spare for recovery (PHALANX_SPARES=rack=1)" in queued["message"]

        lost = placed["nodes"][1]
        kubectl("annotate", "node", lost, f"{NOT_READY}=false", "--overwrite")
        try:
            jobs.wait_restarts("train", 1, timeout=60)
            running = wait_for(
                lambda: (
                    (s := jobs.status("train")).get("phase") == "Running"
                    and int(s.get("gangGeneration") or 0) == 2
                    and s
                ),
                60,
                "the replacement gang running",
            )
            filler = wait_for(
                lambda: (s := jobs.status("filler")).get("preemption") and s, 30, "a preemption"
            )
            events = wait_for(lambda: jobs.events("filler", "Preempted"), 30, "a Preempted event")
            recovered = wait_for(
                lambda: jobs.events("train", "RecoveredOnSpares"), 30, "a RecoveredOnSpares event"
            )
        finally:
            kubectl("annotate", "node", lost, f"{NOT_READY}-", check=False)
    replacement = running["placement"]
    assert replacement["domain"] == rack
    assert sorted(replacement["nodes"]) == sorted(set(members) - {lost})
    assert spare in replacement["nodes"]
    # The filler yielded its node gracefully: queued again, no restart counted, not failed.
    assert filler["restarts"] == 0
    assert int(filler["gangGeneration"]) == 2  # queued again as a new gang
    assert filler["phase"] != "Failed"
    assert filler["preemption"]["by"] == f"{namespace}/train"
    assert filler["preemption"]["nodes"] == [spare]
    assert all(f"for the recovery of {namespace}/train" in e for e in events)
    assert spare in recovered[0]
    assert preempted_count() == before + 1
