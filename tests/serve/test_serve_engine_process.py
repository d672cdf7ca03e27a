"""The engine in a process of its own: same outputs and metrics as the in-process engine,
429 at the same limit, a clean stop, and a crash of that process turning into 503s, never a
hang."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

import httpx
from conftest import LiveServer

from phalanx_serve.engine_process import EngineClient

PROMPTS = ["The quick brown fox", "def main():", "Once upon a time", "1 2 3"]


def _client(server: LiveServer) -> EngineClient:
    engine = server.runtime.engine
    assert isinstance(engine, EngineClient)
    return engine


def _complete(url: str, prompt: str, **extra: object) -> dict[str, object]:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _stream_text(url: str, prompt: str, **extra: object) -> str:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True, **extra}
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_outputs_and_metrics_equal_the_in_process_engine(
    server: LiveServer, make_server: Callable[..., LiveServer]
) -> None:
    remote = make_server(engine_process=True)
    assert remote.runtime.engine is not None
    assert _client(remote).process.is_alive()
    for prompt in PROMPTS:
        here = _complete(server.url, prompt)
        there = _complete(remote.url, prompt)
        assert there["choices"] == here["choices"]  # type: ignore[index]
        assert there["usage"] == here["usage"]  # type: ignore[index]
        assert _stream_text(remote.url, prompt) == here["choices"][0]["text"]  # type: ignore[index]
    # Sampled with a seed, with logprobs, several choices: all of it crosses the pipe.
    extra = {"temperature": 0.8, "seed": 7, "n": 2, "logprobs": 2}
    here = _complete(server.url, PROMPTS[0], **extra)
    there = _complete(remote.url, PROMPTS[0], **extra)
    assert there["choices"] == here["choices"]  # type: ignore[index]
    # Metric updates made in the engine process are replayed on the server's registry.
    assert remote.metric("phalanx_serve_generation_tokens_total") == 4 * 2 * 24 + 2 * 24
    assert remote.metric("phalanx_serve_request_success_total", finished_reason="length") == 10
    assert remote.metric("phalanx_serve_time_to_first_token_seconds_count") == 10
    assert remote.metric("phalanx_serve_num_requests_running") == 0


def test_queue_limit_is_enforced_by_the_server(make_server: Callable[..., LiveServer]) -> None:
    remote = make_server(engine_process=True, max_batch_size=1, max_queue=0)
    pid = _client(remote).process.pid
    assert pid is not None
    body = {"prompt": "x", "max_tokens": 20, "stream": True}
    os.kill(pid, signal.SIGSTOP)  # the first request stays unfinished however fast the model
    try:
        with httpx.stream("POST", remote.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            second = httpx.post(
                remote.url + "/v1/completions", json={"prompt": "y", "max_tokens": 2}
            )
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "queue_full"
            os.kill(pid, signal.SIGCONT)
            assert list(r.iter_lines())[-2] == "data: [DONE]"
    finally:
        os.kill(pid, signal.SIGCONT)
    # The first one is done: there is room again.
    assert _complete(remote.url, "y")["choices"]


def test_killed_engine_process_fails_requests_and_health(
    make_server: Callable[..., LiveServer],
) -> None:
    remote = make_server(engine_process=True)
    client = _client(remote)
    body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    pid = client.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the request is surely unfinished when the process dies
    with httpx.stream("POST", remote.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        os.kill(pid, signal.SIGKILL)
        events = [line for line in r.iter_lines() if line]  # it ends: no hang
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])
    assert "engine process exited" in error["error"]["message"]
    health = httpx.get(remote.url + "/health")
    assert health.status_code == 503
    assert health.json()["status"] == "engine stopped"
    after = httpx.post(remote.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert after.status_code == 503
    assert after.json()["error"]["type"] == "service_unavailable"


def test_engine_loop_failure_is_reported(make_server: Callable[..., LiveServer]) -> None:
    # A prompt the engine cannot embed (an id past the vocabulary) raises inside the loop of
    # the engine process: the request gets the error, then /health turns red.
    remote = make_server(engine_process=True)
    vocab = remote.runtime.loaded.config.vocab_size  # type: ignore[union-attr]
    r = httpx.post(
        remote.url + "/v1/completions",
        json={"prompt": [1, 2], "max_tokens": 2},
        timeout=30,
    )
    assert r.status_code == 200  # a valid request still works
    client = _client(remote)
    client._send(("submit", [("probe", [vocab + 5], _params())]))  # bypasses the API's check
    client.process.join(timeout=30)
    assert client.process.exitcode == 1
    assert httpx.get(remote.url + "/health").status_code == 503


def test_stop_ends_the_engine_process(make_server: Callable[..., LiveServer]) -> None:
    remote = make_server(engine_process=True)
    client = _client(remote)
    assert _complete(remote.url, "x")["choices"]
    remote.stop()
    client.process.join(timeout=30)
    assert client.process.exitcode == 0


def _params() -> object:
    from phalanx_serve.sampling import SamplingParams

    return SamplingParams(max_tokens=2, temperature=0.0)
