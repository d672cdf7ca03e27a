"""The official ``openai`` Python SDK against the server: sync, async, streaming, parameters."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from conftest import LiveServer

PROMPT = "The operator precedence table"
VLLM_EXTRAS = {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 2}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def raw(server: LiveServer) -> Any:
    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return dict(r.json())

    return post


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_completion_with_every_openai_parameter(client: openai.OpenAI, raw: Any) -> None:
    params: dict[str, Any] = dict(
        model="tiny",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0.8,
        top_p=0.9,
        seed=3,
        n=2,
        best_of=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"65": 2.0},
        stop=["zzz"],
        user="tester",
    )
    got = client.completions.create(**params, extra_body={"ignore_eos": True, **VLLM_EXTRAS})
    expected = raw("/v1/completions", {**params, "ignore_eos": True, **VLLM_EXTRAS})
    assert [c.text for c in got.choices] == [c["text"] for c in expected["choices"]]
    assert [c.index for c in got.choices] == [0, 1]
    assert got.usage is not None
    assert got.usage.completion_tokens == 36


def test_completion_logprobs_and_prompt_scoring(client: openai.OpenAI) -> None:
    got = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    lp = got.choices[0].logprobs
    assert lp is not None
    assert lp.token_logprobs is not None
    assert lp.top_logprobs is not None
    assert got.choices[0].text == PROMPT
    assert lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(top is not None and len(top) >= 2 for top in lp.top_logprobs[1:])


def test_chat_with_logprobs_n_and_seed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model="tiny",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
        ],
        max_completion_tokens=8,
        temperature=0.7,
        seed=9,
        n=2,
        logprobs=True,
        top_logprobs=3,
        stop=["\n\n"],
    )
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    for choice in first.choices:
        assert choice.logprobs is not None
        assert choice.logprobs.content is not None
        for entry in choice.logprobs.content:
            assert len(entry.top_logprobs) == 3
        assert "".join(e.token for e in choice.logprobs.content).startswith(
            choice.message.content or ""
        )


def test_streaming_completion_and_chat_match_non_streaming(client: openai.OpenAI) -> None:
    body: dict[str, Any] = dict(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    full = client.completions.create(**body).choices[0].text
    stream = client.completions.create(**body, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20

    chat: dict[str, Any] = dict(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=15, temperature=0
    )
    whole = client.chat.completions.create(**chat).choices[0].message.content
    parts = client.chat.completions.create(**chat, stream=True, n=2)
    texts = ["", ""]
    for c in parts:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [whole, whole]


def test_async_client_concurrent_requests_equal_sequential(
    server: LiveServer, client: openai.OpenAI
) -> None:
    prompts = [f"{PROMPT} {i}" for i in range(6)]
    sequential = [
        client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0)
        .choices[0]
        .text
        for p in prompts
    ]

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0
        ) as aclient:
            results = await asyncio.gather(
                *(
                    aclient.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0)
                    for p in prompts
                )
            )
            stream = await aclient.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                stream=True,
            )  # fmt: skip
            assert [c async for c in stream]
        return [r.choices[0].text for r in results]

    assert asyncio.run(run()) == sequential


def test_sdk_errors_carry_the_status_and_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-9", prompt="x")
    assert "gpt-9" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert "tools is not supported" in str(tools.value)
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model="tiny", prompt="x", extra_body={"beam_width": 4})
    assert "Unrecognized request argument supplied: beam_width" in str(unknown.value)
