"""Schemathesis fuzzes every operation of the OpenAPI schema: no input may produce a 5xx."""

from __future__ import annotations

import collections
from collections.abc import Callable

import pytest
import schemathesis
from conftest import LiveServer
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

EXAMPLES_PER_MODE = 60


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_input_produces_a_server_error(
    make_server: Callable[..., LiveServer], mode: GenerationMode
) -> None:
    # A short context keeps the valid requests that do generate quick.
    server = make_server(max_model_len=48, dtype="float32", max_body_bytes=64 * 1024)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    statuses: list[int] = []

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.url, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, (
            f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
        )

    check()
    assert server.runtime.ready
    assert len(statuses) >= EXAMPLES_PER_MODE // 2
    if mode == GenerationMode.POSITIVE:  # valid requests must really have generated
        assert 200 in statuses, collections.Counter(statuses)
