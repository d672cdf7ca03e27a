"""The OpenAI-compatible HTTP API (FastAPI) in front of the engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health`` (200 only when weights are loaded, warmed up and the engine runs),
``GET /metrics`` (Prometheus). Every refusal is an OpenAI-style error body: 400 for bad input,
401 for a wrong API key, 413 for an oversized body, 429 when the queue is full, 503 while not
ready. Client disconnects abort the request so its KV slot is freed at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from phalanx_serve.body_limit import BodySizeLimit
from phalanx_serve.chat_template import ChatTemplateError
from phalanx_serve.engine import EngineDeadError, QueueFullError, RequestOutput, Sequence
from phalanx_serve.errors import APIError, bad_request, install_error_handlers
from phalanx_serve.metrics import ServeMetrics
from phalanx_serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
)
from phalanx_serve.runtime import ServerRuntime
from phalanx_serve.sampling import SamplingParams
from phalanx_serve.settings import ServerSettings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 429, 503)
}


@dataclass
class Generation:
    """A request handed to the engine, with the queue its outputs arrive on."""

    seq: Sequence
    outputs: asyncio.Queue[RequestOutput | None]
    request_id: str
    created: int
    prompt_text: str


def create_app(settings: ServerSettings, *, runtime: ServerRuntime | None = None) -> FastAPI:
    rt = runtime or ServerRuntime(settings, ServeMetrics(settings.model_name))
    metrics = rt.metrics

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if rt.status == "loading" and rt.engine is None:
            rt.start_loading()
        yield
        rt.shutdown()

    app = FastAPI(title="Phalanx inference server", version="0.1.0", lifespan=lifespan)
    app.state.runtime = rt
    install_error_handlers(app, on_invalid=lambda: metrics.request_rejected("invalid"))
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        on_reject=lambda: metrics.request_rejected("too_large"),
    )

    async def require_api_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            metrics.request_rejected("unauthorized")
            raise APIError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer <key>')",
                type_="authentication_error",
                code="invalid_api_key",
            )

    auth = [Depends(require_api_key)]

    @app.get("/health", responses={503: {"description": "loading, failed, or engine stopped"}})
    async def health() -> JSONResponse:
        state = rt.health()
        body: dict[str, Any] = {"status": state}
        if rt.error:
            body["error"] = rt.error
        return JSONResponse(body, status_code=200 if rt.ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth, response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        card = ModelCard(
            id=settings.model_name,
            created=int(time.time()),
            root=settings.model,
            max_model_len=rt.max_model_len,
        )
        return ModelList(data=[card])

    @app.post(
        "/v1/completions",
        dependencies=auth,
        response_model=None,
        responses={200: {"model": CompletionResponse}, **ERROR_RESPONSES},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_ready(rt)
        _check_model(body, settings)
        prompt_ids, prompt_text = await _tokenize_completion_prompt(rt, body)
        max_tokens = body.max_tokens or body.max_completion_tokens or 16
        gen = _submit(
            rt,
            "cmpl",
            prompt_ids,
            _sampling_params(rt, body, len(prompt_ids), max_tokens),
            prompt_text,
        )
        echo = prompt_text if body.echo else ""
        if body.stream:
            return _sse(_completion_chunks(gen, settings.model_name, body, echo), rt, gen)
        final, text = await _collect(rt, gen, request)
        return JSONResponse(
            {
                "id": gen.request_id,
                "object": "text_completion",
                "created": gen.created,
                "model": settings.model_name,
                "choices": [
                    {
                        "index": 0,
                        "text": echo + text,
                        "logprobs": None,
                        "finish_reason": final.finish_reason,
                    }
                ],
                "usage": _usage(final),
            }
        )

    @app.post(
        "/v1/chat/completions",
        dependencies=auth,
        response_model=None,
        responses={200: {"model": ChatCompletionResponse}, **ERROR_RESPONSES},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check_ready(rt)
        _check_model(body, settings)
        prompt_ids, prompt_text = await _tokenize_chat_prompt(rt, body)
        max_tokens = (
            body.max_tokens
            or body.max_completion_tokens
            or max(rt.max_model_len - len(prompt_ids), 1)
        )
        gen = _submit(
            rt,
            "chatcmpl",
            prompt_ids,
            _sampling_params(rt, body, len(prompt_ids), max_tokens),
            prompt_text,
        )
        if body.stream:
            return _sse(_chat_chunks(gen, settings.model_name, body), rt, gen)
        final, text = await _collect(rt, gen, request)
        return JSONResponse(
            {
                "id": gen.request_id,
                "object": "chat.completion",
                "created": gen.created,
                "model": settings.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": final.finish_reason,
                    }
                ],
                "usage": _usage(final),
            }
        )

    return app


# -- request handling --------------------------------------------------------------------------


def _check_ready(rt: ServerRuntime) -> None:
    if not rt.ready:
        rt.metrics.request_rejected("not_ready")
        raise APIError(
            503,
            f"model is not ready ({rt.health()})",
            type_="service_unavailable",
            headers={"Retry-After": "5"},
        )


def _check_model(body: SamplingFields, settings: ServerSettings) -> None:
    if body.model is not None and body.model != settings.model_name:
        raise APIError(
            400,
            f"model {body.model!r} is not served here; available: [{settings.model_name!r}]",
            code="model_not_found",
            param="model",
        )


async def _tokenize_completion_prompt(
    rt: ServerRuntime, body: CompletionRequest
) -> tuple[list[int], str]:
    assert rt.loaded is not None
    tokenizer = rt.loaded.tokenizer
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        ids = [int(t) for t in prompt]
        vocab = rt.loaded.config.vocab_size
        if max(ids) >= vocab:
            raise bad_request(
                f"prompt token ids must be below the vocabulary size {vocab}", param="prompt"
            )
        return ids, tokenizer.decode(ids, skip_special_tokens=False)
    text = prompt if isinstance(prompt, str) else str(prompt[0])
    # Tokenizing a long prompt takes a while; keep the event loop free for other clients.
    ids = (await asyncio.to_thread(tokenizer.encode, text)).ids
    return list(ids), text


async def _tokenize_chat_prompt(
    rt: ServerRuntime, body: ChatCompletionRequest
) -> tuple[list[int], str]:
    assert rt.loaded is not None
    assert rt.chat_template is not None
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = rt.chat_template.render(
            messages,
            add_generation_prompt=body.add_generation_prompt,
            bos_token=rt.loaded.bos_token or "",
            eos_token=rt.loaded.eos_token or "",
        )
    except ChatTemplateError as exc:
        raise bad_request(str(exc), param="messages") from exc
    # A model's own template writes its special tokens itself; the default one does not.
    add_special = rt.loaded.chat_template is None or rt.settings.chat_template is not None
    encoding = await asyncio.to_thread(
        rt.loaded.tokenizer.encode, text, add_special_tokens=add_special
    )
    return list(encoding.ids), text


def _sampling_params(
    rt: ServerRuntime, body: SamplingFields, prompt_len: int, max_tokens: int
) -> SamplingParams:
    limit = rt.max_model_len
    if prompt_len == 0:
        raise bad_request("the prompt is empty after tokenization", param="prompt")
    if prompt_len + max_tokens > limit:
        raise bad_request(
            f"this model's maximum context length is {limit} tokens, but {prompt_len + max_tokens} "
            f"were requested ({prompt_len} in the prompt, {max_tokens} for the completion); "
            "shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None or body.top_k < 0 else body.top_k,
        seed=body.seed,
        stop=stop,
        ignore_eos=body.ignore_eos,
    )


def _submit(
    rt: ServerRuntime, prefix: str, prompt_ids: list[int], params: SamplingParams, prompt_text: str
) -> Generation:
    assert rt.engine is not None
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[RequestOutput | None] = asyncio.Queue()

    def sink(out: RequestOutput) -> None:
        # Called on the engine thread; a closed loop (server stopping) raises and is logged.
        loop.call_soon_threadsafe(outputs.put_nowait, out)

    request_id = f"{prefix}-{uuid.uuid4().hex}"
    try:
        seq = rt.engine.submit(request_id, prompt_ids, params, sink)
    except QueueFullError as exc:
        rt.metrics.request_rejected("queue_full")
        raise APIError(
            429, str(exc), type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        ) from exc
    except EngineDeadError as exc:
        raise APIError(503, str(exc), type_="service_unavailable") from exc
    return Generation(seq, outputs, request_id, int(time.time()), prompt_text)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(
    rt: ServerRuntime, gen: Generation, request: Request
) -> tuple[RequestOutput, str]:
    """Wait for the whole answer; abort the request if the client disconnects meanwhile."""
    assert rt.engine is not None
    engine = rt.engine
    disconnect = asyncio.create_task(_wait_for_disconnect(request))

    def on_disconnect(task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            engine.abort(gen.seq)
            gen.outputs.put_nowait(None)  # wake the waiter below

    disconnect.add_done_callback(on_disconnect)
    parts: list[str] = []
    try:
        while True:
            out = await gen.outputs.get()
            if out is None:
                raise APIError(499, "client closed the request")
            parts.append(out.text)
            if out.finished:
                if out.error is not None:
                    raise APIError(
                        503, f"generation failed: {out.error}", type_="service_unavailable"
                    )
                return out, "".join(parts)
    finally:
        disconnect.cancel()
        engine.abort(gen.seq)


def _usage(out: RequestOutput) -> dict[str, int]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }


# -- streaming ---------------------------------------------------------------------------------


def _sse(
    chunks: AsyncIterator[dict[str, Any]], rt: ServerRuntime, gen: Generation
) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the client disconnects too (the response task is cancelled).
            if rt.engine is not None:
                rt.engine.abort(gen.seq)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _outputs(gen: Generation) -> AsyncIterator[RequestOutput]:
    while True:
        out = await gen.outputs.get()
        if out is None:
            return
        yield out
        if out.finished:
            return


def _include_usage(body: SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _completion_chunks(
    gen: Generation, model: str, body: CompletionRequest, echo: str
) -> AsyncIterator[dict[str, Any]]:
    usage = _include_usage(body)

    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": gen.request_id,
            "object": "text_completion",
            "created": gen.created,
            "model": model,
            "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if usage:
            c["usage"] = None
        return c

    if echo:
        yield chunk(echo, None)
    async for out in _outputs(gen):
        if out.error is not None:
            yield {
                "error": {
                    "message": f"generation failed: {out.error}",
                    "type": "service_unavailable",
                }
            }
            return
        if out.text or out.finished:
            yield chunk(out.text, out.finish_reason if out.finished else None)
        if out.finished and usage:
            yield {
                "id": gen.request_id,
                "object": "text_completion",
                "created": gen.created,
                "model": model,
                "choices": [],
                "usage": _usage(out),
            }


async def _chat_chunks(
    gen: Generation, model: str, body: ChatCompletionRequest
) -> AsyncIterator[dict[str, Any]]:
    usage = _include_usage(body)

    def chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": gen.request_id,
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if usage:
            c["usage"] = None
        return c

    yield chunk({"role": "assistant", "content": ""}, None)
    async for out in _outputs(gen):
        if out.error is not None:
            yield {
                "error": {
                    "message": f"generation failed: {out.error}",
                    "type": "service_unavailable",
                }
            }
            return
        if out.text:
            yield chunk({"content": out.text}, None)
        if out.finished:
            yield chunk({}, out.finish_reason)
            if usage:
                yield {
                    "id": gen.request_id,
                    "object": "chat.completion.chunk",
                    "created": gen.created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(out),
                }
