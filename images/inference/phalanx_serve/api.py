"""The OpenAI-compatible HTTP API (FastAPI) in front of the engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health`` (200 only when weights are loaded, warmed up and the engine runs),
``GET /metrics`` (Prometheus). Every refusal is an OpenAI-style error body: 400 for bad input,
401 for a wrong API key, 413 for an oversized body, 429 when the queue is full, 503 while not
ready. Client disconnects abort the request so its KV slot is freed at the next step.

This module only wires the app together; the routes live in ``routes``, turning bodies into
engine input in ``inputs``, the engine hand-off in ``generation``, response bodies in
``responses`` and server-sent events in ``streaming``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from phalanx_serve.body_limit import BodySizeLimit
from phalanx_serve.errors import install_error_handlers
from phalanx_serve.generation import Relays
from phalanx_serve.metrics import ServeMetrics
from phalanx_serve.routes import openai, probes
from phalanx_serve.runtime import ServerRuntime
from phalanx_serve.settings import ServerSettings


def create_app(settings: ServerSettings, *, runtime: ServerRuntime | None = None) -> FastAPI:
    rt = runtime or ServerRuntime(settings, ServeMetrics.for_settings(settings))
    metrics = rt.metrics

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if rt.status == "loading" and rt.engine is None:
            rt.loop = asyncio.get_running_loop()
            rt.start_loading()
        yield
        rt.shutdown()

    app = FastAPI(title="Phalanx inference server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.runtime = rt
    relays: Relays = {}
    app.state.relays = relays
    install_error_handlers(app, on_invalid=lambda: metrics.request_rejected("invalid"))
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        on_reject=lambda: metrics.request_rejected("too_large"),
    )
    app.include_router(probes)
    app.include_router(openai)
    return app
