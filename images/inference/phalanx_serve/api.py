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
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from phalanx_serve.body_limit import BodySizeLimit
from phalanx_serve.chat_template import ChatTemplateError
from phalanx_serve.engine import (
    EngineDeadError,
    QueueFullError,
    RequestOutput,
    Sequence,
    SubmitRequest,
)
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
from phalanx_serve.responses import (
    Entry,
    LogprobFormatter,
    SequenceResult,
    generated_entries,
    pick_best,
    prompt_entries,
)
from phalanx_serve.runtime import ServerRuntime
from phalanx_serve.sampling import SamplingParams
from phalanx_serve.settings import ServerSettings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


def create_app(settings: ServerSettings, *, runtime: ServerRuntime | None = None) -> FastAPI:
    rt = runtime or ServerRuntime(settings, ServeMetrics(settings.model_name))
    metrics = rt.metrics
    relays: Relays = {}  # one per event loop serving this app (in practice one)

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

    def model_card() -> ModelCard:
        return ModelCard(
            id=settings.model_name,
            created=int(time.time()),
            root=settings.model,
            max_model_len=rt.max_model_len,
        )

    @app.get("/v1/models", dependencies=auth, response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get(
        "/v1/models/{model_id:path}",
        dependencies=auth,
        response_model=ModelCard,
        responses=ERROR_RESPONSES,
    )
    async def retrieve_model(model_id: str) -> ModelCard:
        _check_model(model_id, settings)
        return model_card()

    @app.post(
        "/v1/completions",
        dependencies=auth,
        response_model=None,
        responses={200: {"model": CompletionResponse}, **ERROR_RESPONSES},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_ready(rt)
        _check_model(body.model, settings)
        prompts = [await _tokenize_completion_prompt(rt, p) for p in body.prompt]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        best_of = body.best_of or body.n
        want_logprobs = body.logprobs is not None
        requests: list[tuple[list[int], SamplingParams]] = []
        for ids, _ in prompts:
            for j in range(best_of):
                params = _sampling_params(
                    rt,
                    body,
                    len(ids),
                    max_tokens,
                    copy=j,
                    logprobs=body.logprobs,
                    prompt_logprobs=body.logprobs if body.echo and want_logprobs else None,
                    track_logprob=best_of > body.n,
                )
                requests.append((ids, params))
        gen = _submit(rt, relays, "cmpl", requests)
        texts = [text if body.echo else "" for _, text in prompts]
        fmt = LogprobFormatter(rt.token_text)
        if body.stream:
            chunks = _completion_chunks(gen, settings.model_name, body, texts, prompts, fmt)
            return _sse(chunks, rt, gen)
        results = await _collect(rt, gen, request)
        choices: list[dict[str, Any]] = []
        for i, (ids, _) in enumerate(prompts):
            copies = results[i * best_of : (i + 1) * best_of]
            for j, res in enumerate(pick_best(copies, body.n)):
                lp = None
                if want_logprobs:
                    entries = prompt_entries(ids, res.prompt_logprobs) if body.echo else []
                    lp = fmt.completion(entries + generated_entries(res.logprobs), 0)
                choices.append(
                    {
                        "index": i * body.n + j,
                        "text": texts[i] + res.text,
                        "logprobs": lp,
                        "finish_reason": res.finish_reason,
                    }
                )
        return JSONResponse(
            {
                "id": gen.request_id,
                "object": "text_completion",
                "created": gen.created,
                "model": settings.model_name,
                "choices": choices,
                "usage": _usage(sum(len(ids) for ids, _ in prompts), results),
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
        _check_model(body.model, settings)
        prompt_ids, _ = await _tokenize_chat_prompt(rt, body)
        max_tokens = (
            body.max_tokens
            or body.max_completion_tokens
            or max(rt.max_model_len - len(prompt_ids), 1)
        )
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests = [
            (
                prompt_ids,
                _sampling_params(rt, body, len(prompt_ids), max_tokens, copy=j, logprobs=top),
            )
            for j in range(body.n)
        ]
        gen = _submit(rt, relays, "chatcmpl", requests)
        fmt = LogprobFormatter(rt.token_text)
        if body.stream:
            return _sse(_chat_chunks(gen, settings.model_name, body, fmt), rt, gen)
        results = await _collect(rt, gen, request)
        choices = [
            {
                "index": j,
                "message": {"role": "assistant", "content": res.text},
                "logprobs": fmt.chat(res.logprobs) if body.logprobs else None,
                "finish_reason": res.finish_reason,
            }
            for j, res in enumerate(results)
        ]
        return JSONResponse(
            {
                "id": gen.request_id,
                "object": "chat.completion",
                "created": gen.created,
                "model": settings.model_name,
                "choices": choices,
                "usage": _usage(len(prompt_ids), results),
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


def _check_model(model: str | None, settings: ServerSettings) -> None:
    if model is not None and model != settings.model_name:
        raise APIError(
            404,
            f"The model {model!r} does not exist; this server serves {settings.model_name!r}",
            code="model_not_found",
            param="model",
        )


async def _tokenize_completion_prompt(
    rt: ServerRuntime, prompt: str | list[int]
) -> tuple[list[int], str]:
    assert rt.loaded is not None
    tokenizer = rt.loaded.tokenizer
    if isinstance(prompt, list):
        vocab = rt.loaded.config.vocab_size
        if prompt and max(prompt) >= vocab:
            raise bad_request(
                f"prompt token ids must be below the vocabulary size {vocab}", param="prompt"
            )
        return prompt, tokenizer.decode(prompt, skip_special_tokens=False)
    # Tokenizing a long prompt takes a while; keep the event loop free for other clients.
    ids = await _encode(tokenizer.encode, prompt, param="prompt")
    return ids, prompt


async def _encode(encode: Any, text: str, param: str, **kwargs: Any) -> list[int]:
    try:
        encoding = await asyncio.to_thread(encode, text, **kwargs)
    except Exception as exc:  # the tokenizer refusing text is the input's fault
        raise bad_request(f"{param} could not be tokenized: {exc}", param=param) from exc
    return list(encoding.ids)


async def _tokenize_chat_prompt(
    rt: ServerRuntime, body: ChatCompletionRequest
) -> tuple[list[int], str]:
    assert rt.loaded is not None
    assert rt.chat_template is not None
    messages = [m.for_template() for m in body.messages]
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
    ids = await _encode(
        rt.loaded.tokenizer.encode, text, param="messages", add_special_tokens=add_special
    )
    return ids, text


def _token_ids(values: list[int], vocab: int, param: str) -> tuple[int, ...]:
    if any(not 0 <= t < vocab for t in values):
        raise bad_request(
            f"{param} must be token ids below the vocabulary size {vocab}", param=param
        )
    return tuple(values)


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    out = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab:
            raise bad_request(
                f"logit_bias keys must be token ids below the vocabulary size {vocab}, got {key!r}",
                param="logit_bias",
            )
        out.append((token, value))
    return tuple(out)


def _sampling_params(
    rt: ServerRuntime,
    body: SamplingFields,
    prompt_len: int,
    max_tokens: int,
    *,
    copy: int = 0,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    track_logprob: bool = False,
) -> SamplingParams:
    assert rt.loaded is not None
    limit = rt.max_model_len
    vocab = rt.loaded.config.vocab_size
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
    if body.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None or body.top_k < 0 else body.top_k,
        min_p=body.min_p or 0.0,
        # Choices of one request differ; with a seed each choice is still reproducible.
        seed=None if body.seed is None else (body.seed + copy) % 2**63,
        stop=body.stop_strings(),
        stop_token_ids=_token_ids(body.stop_token_ids or [], vocab, "stop_token_ids"),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=_logit_bias(body.logit_bias, vocab),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        track_logprob=track_logprob,
    )


@dataclass
class Generation:
    """The sequences of one request handed to the engine, and the queue their outputs share."""

    seqs: list[Sequence]
    outputs: asyncio.Queue[tuple[int, RequestOutput] | None]
    request_id: str
    created: int


Relays = dict[asyncio.AbstractEventLoop, "OutputRelay"]


def _submit(
    rt: ServerRuntime,
    relays: Relays,
    prefix: str,
    requests: list[tuple[list[int], SamplingParams]],
) -> Generation:
    assert rt.engine is not None
    capacity = rt.settings.max_batch_size + rt.settings.max_queue
    if len(requests) > capacity:
        raise bad_request(
            f"this request needs {len(requests)} sequences (prompts x n or best_of) but the "
            f"server holds at most {capacity}; send fewer prompts or choices",
            param="n",
        )
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[tuple[int, RequestOutput] | None] = asyncio.Queue()
    request_id = f"{prefix}-{uuid.uuid4().hex}"

    relay = relays.get(loop)
    if relay is None:
        relay = relays[loop] = OutputRelay(loop)

    def sink_for(index: int) -> Callable[[RequestOutput], None]:
        def sink(out: RequestOutput) -> None:
            # Called on the engine thread; a closed loop (server stopping) raises and is logged.
            relay.put(outputs, (index, out))

        return sink

    group = [
        SubmitRequest(f"{request_id}-{i}", ids, params, sink_for(i))
        for i, (ids, params) in enumerate(requests)
    ]
    try:
        seqs = rt.engine.submit_group(group)
    except QueueFullError as exc:
        rt.metrics.request_rejected("queue_full")
        raise APIError(
            429, str(exc), type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        ) from exc
    except EngineDeadError as exc:
        raise APIError(503, str(exc), type_="service_unavailable") from exc
    return Generation(seqs, outputs, request_id, int(time.time()))


def _abort(rt: ServerRuntime, gen: Generation) -> None:
    if rt.engine is not None:
        for seq in gen.seqs:
            rt.engine.abort(seq)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(rt: ServerRuntime, gen: Generation, request: Request) -> list[SequenceResult]:
    """Wait for every sequence to finish; abort them all if the client disconnects meanwhile."""
    disconnect = asyncio.create_task(_wait_for_disconnect(request))

    def on_disconnect(task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            _abort(rt, gen)
            gen.outputs.put_nowait(None)  # wake the waiter below

    disconnect.add_done_callback(on_disconnect)
    results = [SequenceResult() for _ in gen.seqs]
    parts: list[list[str]] = [[] for _ in gen.seqs]
    remaining = len(gen.seqs)
    try:
        while remaining:
            item = await gen.outputs.get()
            if item is None:
                raise APIError(499, "client closed the request")
            index, out = item
            _accumulate(results[index], out)
            parts[index].append(out.text)
            if out.finished:
                if out.error is not None:
                    raise APIError(
                        503, f"generation failed: {out.error}", type_="service_unavailable"
                    )
                remaining -= 1
        for res, texts in zip(results, parts, strict=True):
            res.text = "".join(texts)
        return results
    finally:
        disconnect.cancel()
        _abort(rt, gen)


def _accumulate(res: SequenceResult, out: RequestOutput) -> None:
    res.completion_tokens = out.completion_tokens
    res.cumulative_logprob = out.cumulative_logprob
    if out.logprobs:
        res.logprobs.extend(out.logprobs)
    if out.prompt_logprobs is not None:
        res.prompt_logprobs = out.prompt_logprobs
    if out.finished:
        res.finish_reason = out.finish_reason


def _usage(prompt_tokens: int, results: list[SequenceResult]) -> dict[str, int]:
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
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
            _abort(rt, gen)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


class OutputRelay:
    """Hands engine outputs to the event loop with one wake-up per engine step, not one per
    sequence: every sink of a step appends here, and the first one schedules the drain."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue[Any], Any]] = []

    def put(self, queue: asyncio.Queue[Any], item: Any) -> None:
        with self.lock:
            self.pending.append((queue, item))
            first = len(self.pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, item in items:
            queue.put_nowait(item)


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one sequence as one (a stream that fell behind)."""
    logprobs = None if a.logprobs is None and b.logprobs is None else [
        *(a.logprobs or []), *(b.logprobs or [])
    ]  # fmt: skip
    return RequestOutput(
        text=a.text + b.text,
        num_new_tokens=a.num_new_tokens + b.num_new_tokens,
        prompt_tokens=b.prompt_tokens,
        completion_tokens=b.completion_tokens,
        finished=b.finished,
        finish_reason=b.finish_reason,
        error=b.error,
        logprobs=logprobs,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        cumulative_logprob=b.cumulative_logprob,
    )


async def _outputs(gen: Generation) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs as they come; whatever queued up meanwhile is merged into one per sequence, so a
    slow client gets fewer, larger chunks instead of falling further behind."""
    remaining = len(gen.seqs)
    while remaining:
        item = await gen.outputs.get()
        if item is None:
            return
        batch: dict[int, RequestOutput] = {item[0]: item[1]}
        while not gen.outputs.empty():
            more = gen.outputs.get_nowait()
            if more is None:
                break
            k, out = more
            batch[k] = merge_outputs(batch[k], out) if k in batch else out
        for k, out in batch.items():
            yield k, out
            if out.finished:
                remaining -= 1


def _include_usage(body: SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _stream_error(out: RequestOutput) -> dict[str, Any]:
    return {"error": {"message": f"generation failed: {out.error}", "type": "service_unavailable"}}


async def _completion_chunks(
    gen: Generation,
    model: str,
    body: CompletionRequest,
    echoes: list[str],
    prompts: list[tuple[list[int], str]],
    fmt: LogprobFormatter,
) -> AsyncIterator[dict[str, Any]]:
    usage = _include_usage(body)
    n = body.n  # streaming requires best_of == n, so sequence k is choice k
    offsets = [0] * len(gen.seqs)
    tokens = [0] * len(gen.seqs)

    def chunk(index: int, text: str, lp: Any, finish_reason: str | None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": gen.request_id,
            "object": "text_completion",
            "created": gen.created,
            "model": model,
            "choices": [
                {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
            ],
        }
        if usage:
            c["usage"] = None
        return c

    want_logprobs = body.logprobs is not None
    for k in range(len(gen.seqs)):
        echo = echoes[k // n]
        if echo and not (body.echo and want_logprobs):
            yield chunk(k, echo, None, None)
    async for k, out in _outputs(gen):
        if out.error is not None:
            yield _stream_error(out)
            return
        tokens[k] = out.completion_tokens
        lp = None
        text = out.text
        if want_logprobs:
            entries: list[Entry] = []
            if out.prompt_logprobs is not None and body.echo:
                entries = prompt_entries(prompts[k // n][0], out.prompt_logprobs)
                text = echoes[k // n] + text
            entries += generated_entries(out.logprobs or [])
            lp = fmt.completion(entries, offsets[k])
            offsets[k] += sum(len(t) for t in lp["tokens"])
        if text or out.finished or lp:
            yield chunk(k, text, lp, out.finish_reason if out.finished else None)
    if usage:
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        yield {
            "id": gen.request_id,
            "object": "text_completion",
            "created": gen.created,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": sum(tokens),
                "total_tokens": prompt_tokens + sum(tokens),
            },
        }


async def _chat_chunks(
    gen: Generation, model: str, body: ChatCompletionRequest, fmt: LogprobFormatter
) -> AsyncIterator[dict[str, Any]]:
    usage = _include_usage(body)
    tokens = [0] * len(gen.seqs)
    prompt_tokens = len(gen.seqs[0].prompt_ids)

    def chunk(index: int, delta: dict[str, str], lp: Any, finish: str | None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": gen.request_id,
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }
        if usage:
            c["usage"] = None
        return c

    for k in range(len(gen.seqs)):
        yield chunk(k, {"role": "assistant", "content": ""}, None, None)
    async for k, out in _outputs(gen):
        if out.error is not None:
            yield _stream_error(out)
            return
        tokens[k] = out.completion_tokens
        lp = fmt.chat(out.logprobs) if body.logprobs and out.logprobs else None
        if out.text or lp:
            yield chunk(k, {"content": out.text}, lp, None)
        if out.finished:
            yield chunk(k, {}, None, out.finish_reason)
    if usage:
        yield {
            "id": gen.request_id,
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": sum(tokens),
                "total_tokens": prompt_tokens + sum(tokens),
            },
        }
