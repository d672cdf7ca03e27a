"""Why a rank can no longer finish, and what failurePolicy (then the defaults) does about it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from builders import pod

from phalanx.api.trainjob import FailureRule
from phalanx.plan.failure_policy import RankFailure, failure_verdict, rank_failure

READY = frozenset({"n1", "n2"})


def contract(code: int, reason: str, message: str = "") -> str:
    return json.dumps({"exitCode": code, "reason": reason, "message": message})


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        pytest.param(pod("j", 1, phase="Running", node="n1"), None, id="running"),
        pytest.param(pod("j", 1, phase="Succeeded", node="n1"), None, id="succeeded"),
        pytest.param(
            pod("j", 1, phase="Failed", node="n1", exit_code=1, message=contract(3, "DataError", "short")),
            RankFailure(1, "j-1", "n1", 3, ("DataError", "Error"), "short"),
            id="classified-end",
        ),
        pytest.param(
            pod("j", 1, phase="Failed", node="n1", exit_code=137, reason="OOMKilled"),
            RankFailure(1, "j-1", "n1", 137, ("OOMKilled",)),
            id="kubelet-reason",
        ),
        pytest.param(
            pod("j", 1, phase="Failed", node="n1", exit_code=137, pod_reason="Evicted"),
            RankFailure(1, "j-1", "n1", 137, ("Error", "Evicted")),
            id="pod-reason-too",
        ),
        pytest.param(
            pod("j", 1, phase="Running", node="n9"),
            RankFailure(1, "j-1", "n9", None, ("NodeLost",)),
            id="node-lost",
        ),
        pytest.param(
            pod("j", 1, phase="Running", node="n1", terminating="2026-01-01T00:00:00Z"),
            RankFailure(1, "j-1", "n1", None, ("PodDeleted",)),
            id="deleted",
        ),
        pytest.param(
            pod("j", 1, node="n1", image="bad image", waiting=("InvalidImageName", "bad")),
            RankFailure(
                1, "j-1", "n1", None, ("InvalidImageName",),
                "pod j-1 cannot pull image 'bad image' for container trainer (InvalidImageName: bad)",
            ),
            id="invalid-image-name",
        ),
        pytest.param(
            pod("j", 1, node="n1", waiting=("ImagePullBackOff", "back-off")), None,
            id="pull-back-off-waits-for-the-gang-timeout",
        ),
    ],
)  # fmt: skip
def test_rank_failure(observed: dict[str, Any], expected: RankFailure | None) -> None:
    assert rank_failure(observed, READY) == expected


def rules(*raw: dict[str, Any]) -> list[FailureRule]:
    return [FailureRule.model_validate(r) for r in raw]


@pytest.mark.parametrize(
    ("failure", "policy", "expected"),
    [
        pytest.param(
            RankFailure(0, "j-0", "", 2, ("InvalidConfig", "Error")), [],
            ("FailJob", "InvalidConfig is permanent by default: retrying cannot help"),
            id="default-permanent",
        ),
        pytest.param(
            RankFailure(0, "j-0", "", 11, ("CommunicationError",)), [],
            ("RestartGang", "unmatched failures restart the gang"),
            id="default-restart",
        ),
        pytest.param(
            RankFailure(0, "j-0", "", 2, ("InvalidConfig",)),
            rules({"action": "Ignore", "onExitCodes": [2]}),
            ("Ignore", "failurePolicy.rules[0] matches exit code 2"),
            id="exit-code-rule-first",
        ),
        pytest.param(
            RankFailure(0, "j-0", "", 137, ("Error", "Evicted")),
            rules({"action": "FailJob", "onExitCodes": [1]}, {"action": "FailJob", "onReasons": ["Evicted"]}),
            ("FailJob", "failurePolicy.rules[1] matches Evicted"),
            id="first-match-wins",
        ),
    ],
)  # fmt: skip
def test_failure_verdict(
    failure: RankFailure, policy: list[FailureRule], expected: tuple[str, str]
) -> None:
    assert failure_verdict(failure, policy) == expected
