"""Continuous batching returns, request by request, what sequential decoding returns."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import torch
from conftest import LiveServer

from phalanx_trainer.hf import load_pretrained

PROMPTS = [
    "The quick brown fox",
    "def main():",
    "Hello",
    "In the beginning was the word, and the word was",
    "import sys",
    "while True:",
    "A",
    "Numbers: 1, 2, 3,",
    "class Node:",
    "SELECT * FROM",
    "The name of the module is",
    "for i in range(10):",
    "lambda x:",
    "try:\n    pass\nexcept",
    "The operator precedence table",
    "#!/usr/bin/env python",
]


def _body(i: int, prompt: str, **extra: Any) -> dict[str, Any]:
    # Different lengths make sequences join and leave the batch at different steps.
    return {"model": "tiny", "prompt": prompt, "max_tokens": 6 + 5 * (i % 7), **extra}


async def _concurrently(
    url: str, bodies: list[dict[str, Any]], peak: list[float]
) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def watch_running() -> None:
            while True:
                text = (await client.get("/metrics")).text
                for line in text.splitlines():
                    if line.startswith("phalanx_serve_num_requests_running{"):
                        peak.append(float(line.rsplit(" ", 1)[1]))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch_running())
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
        watcher.cancel()
    assert [r.status_code for r in responses] == [200] * len(bodies)
    return [r.json() for r in responses]


def _answer(response: dict[str, Any]) -> tuple[str, str, int]:
    choice = response["choices"][0]
    return choice["text"], choice["finish_reason"], response["usage"]["completion_tokens"]


def test_sixteen_concurrent_greedy_clients_match_sequential(server: LiveServer) -> None:
    bodies = [_body(i, p, temperature=0) for i, p in enumerate(PROMPTS)]
    sequential = [
        _answer(httpx.post(server.url + "/v1/completions", json=b, timeout=60).json())
        for b in bodies
    ]
    peak: list[float] = []
    concurrent = [_answer(r) for r in asyncio.run(_concurrently(server.url, bodies, peak))]
    for body, seq, conc in zip(bodies, sequential, concurrent, strict=True):
        assert conc == seq, f"prompt {body['prompt']!r}"
    assert max(peak, default=0) > 1, "requests were never batched together"


def test_seeded_sampling_is_reproducible_under_batching(server: LiveServer) -> None:
    bodies = [
        _body(i, p, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i)
        for i, p in enumerate(PROMPTS[:8])
    ]
    sequential = [
        _answer(httpx.post(server.url + "/v1/completions", json=b, timeout=60).json())
        for b in bodies
    ]
    concurrent = [_answer(r) for r in asyncio.run(_concurrently(server.url, bodies, []))]
    assert concurrent == sequential


def test_server_output_matches_plain_greedy_decoding(
    server: LiveServer, tiny_model_dir: Any
) -> None:
    """Reference without any cache: the whole sequence re-run for every new token."""
    runtime = server.runtime
    tokenizer = runtime.loaded.tokenizer
    model, _ = load_pretrained(tiny_model_dir, dtype=torch.float64)
    prompt = PROMPTS[3]
    ids = tokenizer.encode(prompt).ids
    out: list[int] = []
    with torch.no_grad():
        for _ in range(24):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token in runtime.loaded.eos_token_ids:
                break
            out.append(token)
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
    got = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert got["choices"][0]["text"] == tokenizer.decode(out)
