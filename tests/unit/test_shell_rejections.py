"""The shell's memory of the API server's refusals: attempts counted, reset by a spec edit or
a success. The API answers are real `ApiException`s as the client raises them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from phalanx import kube
from phalanx.handlers.apply import record_rejection
from phalanx.observe import CreateRejection

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
KEY = ("ml", "j")


def owner(generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": "j", "namespace": "ml", "generation": generation}}


def refused() -> kube.Rejected:
    return kube.Rejected("Pod", "j-0", 422, "spec.dnsPolicy: Unsupported value")


def test_attempts_count_up_and_a_spec_edit_starts_over() -> None:
    memory: dict[tuple[str, str], CreateRejection] = {}
    assert not record_rejection(memory, KEY, [refused()], owner(), NOW)
    assert not record_rejection(memory, KEY, [refused()], owner(), NOW)
    assert memory[KEY] == CreateRejection(
        "Pod j-0", 422, "spec.dnsPolicy: Unsupported value", 2, NOW, 1
    )
    assert not record_rejection(memory, KEY, [refused()], owner(generation=2), NOW)
    assert memory[KEY].attempts == 1


def test_a_successful_create_forgets_the_refusal() -> None:
    memory = {KEY: CreateRejection("Pod j-0", 422, "x", 3, NOW, 1)}
    assert record_rejection(memory, KEY, [{"metadata": {"name": "j-0"}}], owner(), NOW)
    assert memory == {}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (json.dumps({"kind": "Status", "message": 'Pod "j-0" is invalid'}), 'Pod "j-0" is invalid'),
        ("plain text", "plain text"),
    ],
    ids=["status-object", "plain-body"],
)
def test_server_message(body: str, expected: str) -> None:
    error = ApiException(status=422, reason="Unprocessable Entity")
    error.body = body
    assert kube.server_message(error) == expected
