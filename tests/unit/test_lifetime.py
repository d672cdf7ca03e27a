"""The clock-driven rules of a job: deadline, TTL after finishing, pods stuck on dead nodes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from builders import make_job, pod

from phalanx.plan.lifetime import deadline_left, stuck_terminating, ttl_left

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("run_policy", "status", "deadline", "ttl"),
    [
        ({}, {"activeSince": ago(10)}, None, None),
        ({"activeDeadlineSeconds": 100}, {"activeSince": ago(30)}, 70, None),
        ({"activeDeadlineSeconds": 100}, {}, None, None),
        # Pods created long ago but never admitted: queue time does not count.
        ({"activeDeadlineSeconds": 100}, {"startTime": ago(500)}, None, None),
        ({"ttlSecondsAfterFinished": 60}, {"completionTime": ago(61)}, None, -1),
    ],
    ids=["none", "deadline-running", "not-started", "queued-only", "ttl-over"],
)
def test_deadline_and_ttl(
    run_policy: dict[str, int], status: dict[str, str], deadline: float | None, ttl: float | None
) -> None:
    spec = make_job(runPolicy=run_policy).build()
    assert (deadline_left(spec, status, NOW), ttl_left(spec, status, NOW)) == (deadline, ttl)


def test_pods_stuck_on_dead_nodes_are_forced_after_thirty_seconds() -> None:
    pods = [
        pod("j", 0, phase="Running", node="dead", terminating=ago(31)),
        pod("j", 1, phase="Running", node="dead", terminating=ago(5)),
        pod("j", 2, phase="Running", node="alive", terminating=ago(60)),
    ]
    assert stuck_terminating(pods, frozenset({"alive"}), NOW) == (["j-0"], 25)
