"""failurePolicy.nodeLostGraceSeconds: how long a rank's NotReady node is still trusted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from builders import make_job
from builders.node import node
from pydantic import ValidationError

from phalanx.handlers.state import NODE_LOST_GRACE_SECONDS, Cache

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def cache(not_ready_for: float) -> Cache:
    c = Cache()
    c.nodes.put(node("up", True, NOW - timedelta(hours=1)))
    c.nodes.put(node("down", False, NOW - timedelta(seconds=not_ready_for)))
    return c


@pytest.mark.parametrize(
    ("not_ready_for", "grace", "trusted", "wait"),
    [
        pytest.param(5, NODE_LOST_GRACE_SECONDS, {"up", "down"}, 25.0, id="default-30s-within"),
        pytest.param(31, NODE_LOST_GRACE_SECONDS, {"up"}, None, id="default-30s-past"),
        pytest.param(0, 0.0, {"up"}, None, id="zero-reacts-at-once"),
        pytest.param(100, 300.0, {"up", "down"}, 200.0, id="longer-grace"),
    ],
)
def test_a_not_ready_node_is_trusted_for_the_jobs_grace(
    not_ready_for: float, grace: float, trusted: set[str], wait: float | None
) -> None:
    c = cache(not_ready_for)
    assert c.ready_nodes(NOW, grace, also=["up", "down"]) == frozenset(trusted)
    assert c.seconds_until_lost(["up", "down"], NOW, grace) == wait


def test_the_grace_is_a_bounded_job_field_defaulting_to_thirty_seconds() -> None:
    assert make_job("j").build().failure_policy.node_lost_grace_seconds == 30
    assert (
        make_job("j", failurePolicy={"nodeLostGraceSeconds": 0})
        .build()
        .failure_policy.node_lost_grace_seconds
        == 0
    )


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        pytest.param({"nodeLostGraceSeconds": -1}, "nodeLostGraceSeconds", id="grace-negative"),
        pytest.param({"nodeLostGraceSeconds": 3601}, "nodeLostGraceSeconds", id="grace-too-long"),
        pytest.param({"hangTimeoutSeconds": 5}, "hangTimeoutSeconds", id="hang-too-short"),
        pytest.param({"stragglers": {"factor": 1}}, "factor", id="factor-not-above-one"),
        pytest.param({"stragglers": {"windowSeconds": 1}}, "windowSeconds", id="window-too-short"),
        pytest.param({"stragglers": {"action": "Evict"}}, "action", id="unknown-action"),
    ],
)
def test_out_of_range_failure_policy_fields_are_refused_naming_the_field(
    policy: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        make_job("j", failurePolicy=policy).build()
