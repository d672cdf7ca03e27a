"""failurePolicy.nodeLostGraceSeconds on the real control plane: two jobs share a node that
turns NotReady; the one with grace 0 restarts at once, the one with a long grace keeps its
gang meanwhile."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from jobkit import Jobs, outcome

from phalanx.devcluster.testing import Kubectl, wait_for

GPU_HALF = {"type": "nvidia", "perNode": 4}
NOT_READY = "phalanx.dev/fake-node-ready"


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")


def test_each_job_trusts_a_not_ready_node_for_its_own_grace(
    kubectl: Kubectl, namespace: str, run_operator: Callable[..., Any]
) -> None:
    jobs = Jobs(kubectl, namespace)
    node = kubectl.json("get", "nodes")["items"][5]["metadata"]["name"]
    pinned = {"spec": {"nodeSelector": {"kubernetes.io/hostname": node}}}
    with run_operator():
        for name, grace in (("eager", 0), ("patient", 600)):
            jobs.apply(
                name,
                nodes=1,
                accelerator=GPU_HALF,
                failurePolicy={"nodeLostGraceSeconds": grace},
                podTemplate={**outcome("Succeeded", "600s"), **pinned},
            )
        for name in ("eager", "patient"):
            jobs.wait_phase(name, "Running", timeout=60)
        kubectl("annotate", "node", node, f"{NOT_READY}=false", "--overwrite")
        try:
            # A deadline below the default 30 s grace: grace 0 does not wait it out.
            jobs.wait_restarts("eager", 1, timeout=25)
            events = wait_for(lambda: jobs.events("eager", "RankFailed"), 30, "a RankFailed event")
            time.sleep(5)  # the patient job is looked at on the same node events
            patient = jobs.status("patient")
        finally:
            kubectl("annotate", "node", node, f"{NOT_READY}-", check=False)
    assert "NodeLost" in events[0]
    assert patient["restarts"] == 0
    assert patient["phase"] == "Running"
