"""Fixtures for the inference server tests: a locally built tiny model and live servers.

Servers run uvicorn in a background thread of the test process on 127.0.0.1 (real sockets, real
disconnects) and use float64 weights: batch-composition changes the order of floating point
sums, and in float64 that can never flip a greedy argmax, so "same tokens" comparisons are exact.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from phalanx_serve.api import create_app
from phalanx_serve.builtin import ensure_builtin_model
from phalanx_serve.runtime import ServerRuntime
from phalanx_serve.settings import ServerSettings

torch.set_num_threads(1)


class LiveServer:
    """The phalanx_serve app under uvicorn on a free loopback port, in a daemon thread."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def runtime(self) -> ServerRuntime:
        return self.app.state.runtime  # type: ignore[no-any-return]

    def start(self, *, wait_ready: bool = True, timeout: float = 120.0) -> LiveServer:
        self.thread.start()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.runtime.status == "failed":
                raise RuntimeError(f"server failed to load: {self.runtime.error}")
            time.sleep(0.1)
        raise TimeoutError(f"server at {self.url} not ready after {timeout} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def metric(self, name: str, **labels: str) -> float:
        """Current value of one sample from /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics").text
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            head, _, label_text = series.partition("{")
            if head != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                return float(value)
        return 0.0


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("phalanx-cache")
    os.environ["PHALANX_CACHE_DIR"] = str(cache)
    return ensure_builtin_model("builtin:tiny")


@pytest.fixture(scope="session")
def base_settings(tiny_model_dir: Path) -> ServerSettings:
    return ServerSettings(
        model=str(tiny_model_dir),
        served_model_name="tiny",
        host="127.0.0.1",
        port=0,
        max_batch_size=16,
        max_model_len=256,
        max_queue=64,
        dtype="float64",
        device="cpu",
        threads=1,
    )


@pytest.fixture(scope="session")
def server(base_settings: ServerSettings) -> Iterator[LiveServer]:
    """One shared server for tests that only send ordinary requests."""
    live = LiveServer(base_settings).start()
    yield live
    live.stop()


@pytest.fixture
def make_server(base_settings: ServerSettings) -> Iterator[Callable[..., LiveServer]]:
    """Start a dedicated server with overridden settings; stopped after the test."""
    started: list[LiveServer] = []

    def make(*, wait_ready: bool = True, **overrides: object) -> LiveServer:
        settings = replace(base_settings, **overrides)  # type: ignore[arg-type]
        live = LiveServer(settings).start(wait_ready=wait_ready)
        started.append(live)
        return live

    yield make
    for live in started:
        live.stop()
