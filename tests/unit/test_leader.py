"""Who may take the leader-election Lease: the decision client-go's leaderelection makes."""

from __future__ import annotations

from typing import Any

import pytest

from phalanx.handlers.leader import may_take


@pytest.mark.parametrize(
    ("record", "unchanged_for", "allowed"),
    [
        pytest.param(None, 0, True, id="no-lease-yet"),
        pytest.param({"holderIdentity": "", "leaseDurationSeconds": 15}, 0, True, id="released"),
        pytest.param({"holderIdentity": "me", "leaseDurationSeconds": 15}, 0, True, id="mine"),
        pytest.param(
            {"holderIdentity": "other", "leaseDurationSeconds": 15}, 14.9, False, id="held"
        ),
        pytest.param(
            {"holderIdentity": "other", "leaseDurationSeconds": 15}, 15, True, id="expired"
        ),
        pytest.param({"holderIdentity": "other"}, 10, False, id="default-duration-held"),
    ],
)
def test_may_take(record: dict[str, Any] | None, unchanged_for: float, allowed: bool) -> None:
    assert may_take(record, "me", unchanged_for, 15) is allowed
