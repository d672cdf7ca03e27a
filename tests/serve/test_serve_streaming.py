"""Server-Sent Events: chunks add up to the non-streaming answer and end with [DONE]."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import LiveServer

from phalanx_serve.protocol import CompletionChoice, CompletionChunk
from phalanx_serve.responses import ResponseHeader, StreamChunks, sse_event


def _events(url: str, path: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line.removeprefix("data: ") for line in lines]


CASES = [
    pytest.param(
        {"prompt": "The quick brown fox", "max_tokens": 30, "temperature": 0}, id="greedy"
    ),
    pytest.param(
        {"prompt": "def main():", "max_tokens": 40, "temperature": 0.8, "seed": 7}, id="seeded"
    ),
    pytest.param(
        {"prompt": "Hello", "max_tokens": 60, "temperature": 0, "stop": ["e", "in"]}, id="stop"
    ),
    pytest.param(
        {"prompt": [5, 17, 300], "max_tokens": 10, "temperature": 0, "echo": True},
        id="token-ids-echo",
    ),
]


@pytest.mark.parametrize("body", CASES)
def test_completion_stream_concatenates_to_the_full_answer(
    server: LiveServer, body: dict[str, Any]
) -> None:
    full = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    events = _events(
        server.url, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks.pop()
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == full["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == full["choices"][0][
        "finish_reason"
    ]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


def test_stop_string_is_cut_and_reported(server: LiveServer) -> None:
    body = {"prompt": "Hello", "max_tokens": 60, "temperature": 0}
    free = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0][
        "text"
    ]
    stop = free[5:8]
    cut = httpx.post(server.url + "/v1/completions", json={**body, "stop": stop}, timeout=60).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == free[: free.index(stop)]


def test_chat_stream_concatenates_to_the_full_answer(server: LiveServer) -> None:
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
        ],
        "max_tokens": 25,
        "temperature": 0,
    }
    full = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert full["object"] == "chat.completion"
    events = _events(server.url, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert "usage" not in chunks[-1]  # not asked for


def test_every_stream_ends_with_done_even_when_the_stop_string_comes_first(
    server: LiveServer,
) -> None:
    body = {"prompt": "Hello", "max_tokens": 20, "temperature": 0}
    first = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0][
        "text"
    ]
    events = _events(server.url, "/v1/completions", {**body, "stop": first[:2]})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("include_usage", [True, False], ids=["with-usage", "without-usage"])
@pytest.mark.parametrize(
    ("index", "text", "finish_reason"),
    [(0, "Hello", None), (3, ' "quoted" \u00e9\n', "length"), (1, "", "stop")],
    ids=["first", "escapes-and-finish", "empty-stop"],
)
def test_text_chunks_are_what_the_protocol_models_dump(
    include_usage: bool, index: int, text: str, finish_reason: str | None
) -> None:
    chunks = StreamChunks(ResponseHeader("cmpl-1", 1700000000, "tiny"), include_usage)
    model = CompletionChunk(
        id="cmpl-1",
        created=1700000000,
        model="tiny",
        choices=[CompletionChoice(index=index, text=text, finish_reason=finish_reason)],
    ).model_dump(exclude=None if include_usage else {"usage"})
    assert chunks.completion(index, text, None, finish_reason) == model
    # Chunks of one stream share no mutable state.
    assert chunks.completion(index, text, None, finish_reason) is not model
    assert chunks.completion(7, "x", None, None)["choices"][0]["index"] == 7
    assert chunks.completion(index, text, None, finish_reason) == model


@pytest.mark.parametrize("include_usage", [True, False], ids=["with-usage", "without-usage"])
@pytest.mark.parametrize(
    ("index", "text", "finish_reason"),
    [(0, "Hello", None), (12, ' "quoted" \u00e9\n\\ \x00 \U0001f600', "length"), (1, "", "stop")],
    ids=["first", "escapes-and-finish", "empty-stop"],
)
def test_text_events_are_the_chunks_written_as_events(
    include_usage: bool, index: int, text: str, finish_reason: str | None
) -> None:
    chunks = StreamChunks(ResponseHeader('cmpl-"1"', 1700000000, "tiny\u00e9"), include_usage)
    expected = sse_event(chunks.completion(index, text, None, finish_reason))
    assert chunks.completion_event(index, text, finish_reason) == expected
