"""A gang whose pods cannot start after they are placed says which pod and why, and does not
wait forever: past the gang timeout it is a counted restart, and past the restart limit the job
fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from jobkit import Jobs, outcome

from phalanx.devcluster.testing import Kubectl


@pytest.fixture(autouse=True)
def _quiet_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")


def test_a_missing_checkpoint_claim_is_named_then_bounded(
    kubectl: Kubectl, run_operator: Callable[..., Any], namespace: str
) -> None:
    jobs = Jobs(kubectl, namespace)
    with run_operator():
        jobs.apply(
            "no-claim",
            nodes=2,
            accelerator={"type": "cpu", "cpu": "100m"},
            checkpoint={"existingClaim": "missing-shards"},
            failurePolicy={"gangTimeoutSeconds": 10, "maxRestarts": 1},
            podTemplate=outcome("Succeeded", "2s"),
        )
        waiting = jobs.wait_condition("no-claim", "Running", "False", "ClaimNotBound", timeout=60)
        assert "pod no-claim-" in waiting["message"]
        assert "missing-shards" in waiting["message"]

        failed = jobs.wait_condition("no-claim", "Failed", "True", timeout=120)

    assert "ClaimNotBound" in failed["message"], failed
    assert jobs.status("no-claim")["restarts"] == 1
