"""Disconnects free KV slots, overload answers 429, bad input answers 4xx, never 5xx."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer
from torch import nn

LONG = {"prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0, "ignore_eos": True}


class SlowModel(nn.Module):
    """Wraps the served model so each forward pass takes at least ``delay`` seconds."""

    def __init__(self, inner: nn.Module, delay: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay = delay

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


class BrokenModel(nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("simulated device failure")


def _slow_down(server: LiveServer, delay: float = 0.01) -> None:
    engine = server.runtime.engine
    engine.model = SlowModel(engine.model, delay)


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.02)


def _slots_free(server: LiveServer) -> bool:
    engine = server.runtime.engine
    return engine.num_running == 0 and engine.cache.blocks.num_used == 0


def test_streaming_client_disconnect_frees_its_kv_slot(
    make_server: Callable[..., LiveServer],
) -> None:
    server = make_server()
    _slow_down(server)
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=30
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        assert server.runtime.engine.num_running == 1
        assert server.metric("phalanx_serve_kv_cache_usage_perc") > 0
    _wait_until(lambda: _slots_free(server))
    assert server.metric("phalanx_serve_request_success_total", finished_reason="abort") == 1
    assert server.metric("phalanx_serve_kv_cache_usage_perc") == 0
    assert server.metric("phalanx_serve_num_requests_running") == 0


def test_non_streaming_client_disconnect_frees_its_kv_slot(
    make_server: Callable[..., LiveServer],
) -> None:
    server = make_server()
    _slow_down(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=LONG, timeout=0.5)
    _wait_until(lambda: _slots_free(server))
    assert server.metric("phalanx_serve_request_success_total", finished_reason="abort") == 1
    ok = httpx.post(server.url + "/v1/completions", json={**LONG, "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200


def test_overload_answers_429_and_the_server_keeps_serving(
    make_server: Callable[..., LiveServer],
) -> None:
    server = make_server(max_batch_size=2, max_queue=2)
    _slow_down(server)
    body = {**LONG, "max_tokens": 30}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/v1/completions", json=body) for _ in range(10))
            )

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 4  # 2 running + 2 queued always fit
    assert codes.count(429) >= 1
    assert set(codes) == {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "retry-after" in refused.headers
    assert server.metric(
        "phalanx_serve_request_rejected_total", reason="queue_full"
    ) == codes.count(429)
    _wait_until(lambda: _slots_free(server))
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


BAD_REQUESTS = [
    pytest.param("/v1/completions", b'{"prompt": "x",', 400, "not valid JSON", id="malformed-json"),
    pytest.param("/v1/completions", b'["a list"]', 400, "", id="json-not-an-object"),
    pytest.param(
        "/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature", id="temperature"
    ),
    pytest.param("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", id="top-p-zero"),
    pytest.param("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k", id="top-k"),
    pytest.param(
        "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", id="max-tokens"
    ),
    pytest.param("/v1/completions", {"prompt": "x", "n": 17}, 400, "n", id="n"),
    pytest.param(
        "/v1/completions", {"prompt": "x", "stop": ["a"] * 5}, 400, "stop", id="too-many-stops"
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "x", "max_tokens": 10_000},
        400,
        "maximum context length",
        id="context",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "word " * 300},
        400,
        "maximum context length",
        id="long-prompt",
    ),
    pytest.param("/v1/completions", {"prompt": ""}, 400, "empty", id="empty-prompt"),
    pytest.param(
        "/v1/completions", {"prompt": [1, 99999]}, 400, "vocabulary", id="token-out-of-vocab"
    ),
    pytest.param("/v1/completions", {"prompt": ["a", 1]}, 400, "prompt", id="mixed-prompts"),
    pytest.param("/v1/completions", {}, 400, "prompt", id="missing-prompt"),
    pytest.param("/v1/chat/completions", {"messages": []}, 400, "messages", id="no-messages"),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "role",
        id="bad-role",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "content",
        id="non-text-part",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "fragment"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_style_error(
    server: LiveServer, path: str, body: Any, status: int, fragment: str
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(
            server.url + path, content=body, headers={"content-type": "application/json"}
        )
    else:
        r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"] or fragment == error.get("param")
    assert httpx.get(server.url + "/health").status_code == 200


def test_oversized_body_gets_413(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(max_body_bytes=1000)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * 2000})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Any:  # no Content-Length: the limit must hold for chunked uploads too
        yield b'{"prompt": "'
        yield b"y" * 2000
        yield b'"}'

    r = httpx.post(
        server.url + "/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


def test_api_key_guards_v1_but_not_probes(make_server: Callable[..., LiveServer]) -> None:
    server = make_server(api_key="s3cret")
    body = {"prompt": "x", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    ok = httpx.post(
        server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_health_is_503_until_loaded_and_warmed_up(
    make_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    import phalanx_serve.runtime as runtime_module

    release = threading.Event()
    real_load = runtime_module.load_model

    def gated_load(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "load_model", gated_load)
    server = make_server(wait_ready=False)
    _wait_until(lambda: _responds(server.url + "/health"))
    assert httpx.get(server.url + "/health").status_code == 503
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"
    release.set()
    server.wait_ready()
    assert (
        httpx.post(
            server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}
        ).status_code
        == 200
    )


def test_dead_engine_turns_health_to_503(make_server: Callable[..., LiveServer]) -> None:
    server = make_server()
    server.runtime.engine.model = BrokenModel()
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30
    )
    assert r.status_code == 503
    assert "simulated device failure" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 503
    after = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert after.status_code == 503


def _responds(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.TransportError:
        return False
    return True
