"""activeDeadlineSeconds counts the time a job is active, as for a Job a queue admits by
resuming it: a gang that waited in the queue longer than its deadline still gets its whole
deadline once placed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from jobkit import GPU_NODE, Jobs, outcome

from phalanx.devcluster.testing import Kubectl, wait_for


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")


def test_queue_time_does_not_count_against_the_deadline(
    kubectl: Kubectl, run_operator: Callable[..., Any], namespace: str
) -> None:
    jobs = Jobs(kubectl, namespace)
    with run_operator():
        # 40 of the 64 nodes each: the second waits for the first to finish (about 25 s).
        jobs.apply("first", nodes=40, accelerator=GPU_NODE, podTemplate=outcome("Succeeded", "25s"))
        jobs.wait_phase("first", "Running", timeout=90)
        jobs.apply(
            "patient",
            nodes=40,
            accelerator=GPU_NODE,
            podTemplate=outcome("Succeeded", "3s"),
            runPolicy={"activeDeadlineSeconds": 12},
        )
        jobs.wait_condition("patient", "Admitted", "False", timeout=60)
        queued = jobs.status("patient")
        assert "activeSince" not in queued

        done = wait_for(
            lambda: (s := jobs.status("patient")).get("phase") in ("Succeeded", "Failed") and s,
            240,
            "the patient job to finish",
        )

    assert done["phase"] == "Succeeded", done["conditions"]
    assert done["activeSince"] >= done["startTime"]
