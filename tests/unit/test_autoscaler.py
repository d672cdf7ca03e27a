"""The built-in autoscaler as a pure function: tables of metric histories and decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from phalanx.api.inference import Autoscaling
from phalanx.plan.autoscale import Sample, recommend, trim

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def history(*points: tuple[int, float]) -> list[Sample]:
    """(seconds ago, requests in flight) pairs, oldest first."""
    return [
        Sample(at=NOW - timedelta(seconds=ago), running=load, waiting=0.0, leaders=1)
        for ago, load in points
    ]


def settings(**fields: Any) -> Autoscaling:
    base = {"minReplicas": 1, "maxReplicas": 10, "target": 10, "scaleDownDelaySeconds": 300}
    return Autoscaling.model_validate({**base, **fields})


@pytest.mark.parametrize(
    ("samples", "spec", "current", "desired", "reason"),
    [
        pytest.param(history(), settings(), 3, 3, "NoMetrics", id="no-samples-keep"),
        pytest.param(history((600, 90)), settings(), 3, 3, "NoMetrics", id="stale-samples-keep"),
        pytest.param(history((5, 45)), settings(), 2, 5, "ScaleUp", id="scale-up-at-once"),
        pytest.param(history((5, 41)), settings(), 2, 5, "ScaleUp", id="rounds-up"),
        pytest.param(history((5, 500)), settings(), 2, 10, "ScaleUp", id="clamped-to-max"),
        pytest.param(
            history((60, 5), (30, 50), (5, 50)),
            settings(scaleUpStabilizationSeconds=45),
            2,
            5,
            "ScaleUp",
            id="up-window-takes-the-minimum",
        ),
        pytest.param(
            history((60, 50), (30, 5), (5, 50)),
            settings(scaleUpStabilizationSeconds=45),
            2,
            2,
            "WithinTarget",
            id="up-window-ignores-a-spike",
        ),
        pytest.param(
            history((400, 5), (200, 5), (5, 5)),
            settings(),
            4,
            1,
            "ScaleDown",
            id="scale-down-after-the-window",
        ),
        pytest.param(
            history((400, 5), (200, 35), (5, 5)),
            settings(),
            4,
            4,
            "WithinTarget",
            id="down-window-takes-the-maximum",
        ),
        pytest.param(
            history((400, 5), (200, 25), (5, 5)),
            settings(),
            4,
            3,
            "ScaleDown",
            id="down-to-the-window-maximum",
        ),
        pytest.param(
            history((100, 0), (5, 0)),
            settings(),
            4,
            4,
            "ScaleDownStabilizing",
            id="window-not-covered-yet",
        ),
        pytest.param(
            history((400, 0), (5, 0)),
            settings(),
            3,
            1,
            "ScaleDown",
            id="never-below-one-by-default",
        ),
        pytest.param(
            history((400, 0), (5, 0)),
            settings(minReplicas=0),
            3,
            0,
            "ScaleDown",
            id="zero-when-asked-for",
        ),
        pytest.param(history(), settings(minReplicas=0), 0, 0, "NoMetrics", id="zero-stays-zero"),
        pytest.param(history((5, 10)), settings(), 1, 1, "WithinTarget", id="exactly-on-target"),
        pytest.param(
            history((5, 10)),
            settings(minReplicas=2, maxReplicas=4),
            7,
            4,
            "OutOfBounds",
            id="outside-bounds-is-pulled-back",
        ),
    ],
)
def test_recommend(
    samples: list[Sample], spec: Autoscaling, current: int, desired: int, reason: str
) -> None:
    decision = recommend(samples, spec, current, NOW)
    assert (decision.desired, decision.reason) == (desired, reason), decision.message


@pytest.mark.parametrize(
    ("metric", "desired"),
    [("requestsRunning", 2), ("requestsWaiting", 3), ("requestsInFlight", 5)],
)
def test_metric_choice(metric: str, desired: int) -> None:
    samples = [Sample(at=NOW, running=20, waiting=30, leaders=2)]
    assert recommend(samples, settings(metric=metric), 1, NOW).desired == desired


def test_trim_keeps_one_sample_older_than_the_window() -> None:
    samples = history((900, 1), (500, 2), (100, 3), (5, 4))
    kept = trim(samples, settings(), NOW)
    assert [s.running for s in kept] == [2, 3, 4]
