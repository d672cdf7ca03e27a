"""A two-process tensor-parallel group (gloo, as the operator wires a two-pod group) answers
exactly what a single process answers; the group's backend follows the model's device (NCCL on
CUDA, gloo otherwise). No GPU group runs here: the NCCL path is checked as a choice only."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer

from phalanx_serve.group import GroupComm, group_backend
from phalanx_serve.settings import (
    GROUP_SIZE_ENV,
    LEADER_ADDRESS_ENV,
    WORKER_INDEX_ENV,
    GroupSettings,
)

BODIES: list[dict[str, Any]] = [
    {"prompt": "The quick brown fox", "max_tokens": 20, "temperature": 0},
    {"prompt": "def main():", "max_tokens": 7, "temperature": 0},
    {"prompt": [5, 17, 300, 2, 9], "max_tokens": 30, "temperature": 0, "ignore_eos": True},
    {"prompt": "Numbers: 1, 2, 3,", "max_tokens": 12, "temperature": 0.9, "seed": 4},
    {"prompt": "import sys", "max_tokens": 5, "temperature": 0, "logprobs": 2},
    {"prompt": "class Node:", "max_tokens": 9, "temperature": 0, "n": 2, "frequency_penalty": 1},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def group(tiny_model_dir: Path) -> Iterator[tuple[list[str], list[subprocess.Popen[bytes]]]]:
    ports = [_free_port() for _ in range(2)]
    env = {
        **os.environ,
        LEADER_ADDRESS_ENV: "127.0.0.1",
        GROUP_SIZE_ENV: "2",
        "PHALANX_SERVE_GROUP_PORT": str(_free_port()),
    }
    cmd = [
        sys.executable, "-m", "phalanx_serve", "--model", str(tiny_model_dir),
        "--served-model-name", "tiny", "--dtype", "float64", "--device", "cpu",
        "--threads", "1", "--max-model-len", "256", "--host", "127.0.0.1",
        "--log-level", "warning",
    ]  # fmt: skip
    procs = [
        subprocess.Popen([*cmd, "--port", str(ports[i])], env={**env, WORKER_INDEX_ENV: str(i)})
        for i in range(2)
    ]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        deadline = time.monotonic() + 120
        while not all(_healthy(u) for u in urls):
            assert all(p.poll() is None for p in procs), "a group process exited during start-up"
            assert time.monotonic() < deadline, "the group did not become ready"
            time.sleep(0.2)
        yield urls, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


async def _all(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in BODIES))
    assert [r.status_code for r in responses] == [200] * len(BODIES)
    return [r.json() for r in responses]


def _choices(response: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(c["text"], c["finish_reason"]) for c in response["choices"]]


def test_two_process_group_equals_one_process(
    server: LiveServer, group: tuple[list[str], list[subprocess.Popen[bytes]]]
) -> None:
    (url, worker_url), procs = group
    alone = asyncio.run(_all(server.url))
    together = asyncio.run(_all(url))
    assert [_choices(r) for r in together] == [_choices(r) for r in alone]
    lp_group = together[4]["choices"][0]["logprobs"]["token_logprobs"]
    lp_alone = alone[4]["choices"][0]["logprobs"]["token_logprobs"]
    assert lp_group == pytest.approx(lp_alone, abs=1e-9)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    a = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
    b = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).json()
    assert b["choices"][0]["message"] == a["choices"][0]["message"]
    # The worker serves no API, and leaves when its leader stops.
    assert httpx.post(worker_url + "/v1/completions", json=BODIES[0]).status_code == 404
    procs[0].terminate()
    # uvicorn shuts down cleanly, then re-raises SIGTERM so the exit status tells of it.
    assert procs[0].wait(timeout=30) in (0, -15)
    assert procs[1].wait(timeout=30) == 0  # told to stop by the leader, not killed


@pytest.mark.parametrize(
    ("device", "nccl", "backend"),
    [
        pytest.param("cpu", True, "gloo", id="cpu-is-gloo"),
        pytest.param("cpu", False, "gloo", id="cpu-needs-no-nccl"),
        pytest.param("cuda:0", True, "nccl", id="cuda-is-nccl"),
        pytest.param("cuda", True, "nccl", id="cuda-default-is-nccl"),
    ],
)
def test_the_group_backend_follows_the_device(
    device: str, nccl: bool, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)
    assert group_backend(torch.device(device)) == backend


def test_a_cuda_group_without_nccl_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(RuntimeError, match="no NCCL"):
        group_backend(torch.device("cuda"))


def test_a_cpu_group_joins_over_gloo() -> None:
    comm = GroupComm(GroupSettings("127.0.0.1", 1, 0, _free_port()), torch.device("cpu"))
    try:
        assert comm.backend == "gloo"
        assert torch.distributed.get_backend() == "gloo"
        t = torch.ones(3)
        comm.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        comm.close()
