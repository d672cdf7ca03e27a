"""The HTTP routes, each a module-level function over the app's ``ServerRuntime`` (reached
through ``request.app.state``): health and metrics without auth, the OpenAI API behind the key.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from phalanx_serve.errors import APIError
from phalanx_serve.generation import Relays, collect, submit
from phalanx_serve.inputs import (
    check_model,
    check_ready,
    sampling_params,
    tokenize_chat_prompt,
    tokenize_completion_prompt,
)
from phalanx_serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from phalanx_serve.responses import (
    LogprobFormatter,
    chat_choice,
    chat_completion_response,
    completion_choice,
    completion_response,
    generated_entries,
    pick_best,
    prompt_entries,
    result_usage,
)
from phalanx_serve.runtime import ServerRuntime
from phalanx_serve.sampling import SamplingParams
from phalanx_serve.settings import ServerSettings
from phalanx_serve.streaming import chat_chunks, completion_chunks, sse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


# Dependencies are coroutines: FastAPI runs a plain ``def`` dependency in its thread pool, a
# thread hop per dependency per request that also contends with the engine thread for the GIL.
async def get_runtime(request: Request) -> ServerRuntime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_relays(request: Request) -> Relays:
    return request.app.state.relays  # type: ignore[no-any-return]


Runtime = Annotated[ServerRuntime, Depends(get_runtime)]
Settings = Annotated[ServerSettings, Depends(get_settings)]
OutputRelays = Annotated[Relays, Depends(get_relays)]


async def require_api_key(request: Request, settings: Settings, rt: Runtime) -> None:
    if not settings.api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), settings.api_key.encode()
    ):
        rt.metrics.request_rejected("unauthorized")
        raise APIError(
            401,
            "invalid or missing API key (send 'Authorization: Bearer <key>')",
            type_="authentication_error",
            code="invalid_api_key",
        )


# Health and metrics stay open: probes and scrapers carry no API key.
probes = APIRouter()
openai = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@probes.get("/health", responses={503: {"description": "loading, failed, or engine stopped"}})
async def health(rt: Runtime) -> JSONResponse:
    body: dict[str, Any] = {"status": rt.health()}
    if rt.error:
        body["error"] = rt.error
    return JSONResponse(body, status_code=200 if rt.ready else 503)


@probes.get("/metrics")
async def prometheus_metrics(rt: Runtime) -> Response:
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _model_card(settings: ServerSettings, rt: ServerRuntime) -> ModelCard:
    return ModelCard(
        id=settings.model_name,
        created=int(time.time()),
        root=settings.model,
        max_model_len=rt.max_model_len,
    )


@openai.get("/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(settings: Settings, rt: Runtime) -> ModelList:
    return ModelList(data=[_model_card(settings, rt)])


@openai.get("/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model_id: str, settings: Settings, rt: Runtime) -> ModelCard:
    check_model(model_id, settings)
    return _model_card(settings, rt)


@openai.post(
    "/completions",
    response_model=None,
    responses={200: {"model": CompletionResponse}, **ERROR_RESPONSES},
)
async def completions(
    body: CompletionRequest,
    request: Request,
    settings: Settings,
    rt: Runtime,
    relays: OutputRelays,
) -> Response:
    check_ready(rt)
    check_model(body.model, settings)
    prompts = [await tokenize_completion_prompt(rt, p) for p in body.prompt]
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    best_of = body.best_of or body.n
    want_logprobs = body.logprobs is not None
    requests: list[tuple[list[int], SamplingParams]] = []
    for ids, _ in prompts:
        for j in range(best_of):
            params = sampling_params(
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
    gen = submit(rt, relays, "cmpl", requests)
    texts = [text if body.echo else "" for _, text in prompts]
    fmt = LogprobFormatter(rt.token_text)
    if body.stream:
        chunks = completion_chunks(gen, settings.model_name, body, texts, prompts, fmt)
        return sse(chunks, rt, gen)
    results = await collect(rt, gen, request)
    choices: list[CompletionChoice] = []
    for i, (ids, _) in enumerate(prompts):
        copies = results[i * best_of : (i + 1) * best_of]
        for j, res in enumerate(pick_best(copies, body.n)):
            lp = None
            if want_logprobs:
                entries = prompt_entries(ids, res.prompt_logprobs) if body.echo else []
                lp = fmt.completion(entries + generated_entries(res.logprobs), 0)
            choices.append(
                completion_choice(i * body.n + j, texts[i] + res.text, lp, res.finish_reason)
            )
    used = result_usage(sum(len(ids) for ids, _ in prompts), results)
    response = completion_response(gen.header(settings.model_name), choices, used)
    return JSONResponse(response.model_dump())


@openai.post(
    "/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletionResponse}, **ERROR_RESPONSES},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    settings: Settings,
    rt: Runtime,
    relays: OutputRelays,
) -> Response:
    check_ready(rt)
    check_model(body.model, settings)
    prompt_ids, _ = await tokenize_chat_prompt(rt, body)
    max_tokens = (
        body.max_tokens or body.max_completion_tokens or max(rt.max_model_len - len(prompt_ids), 1)
    )
    top = (body.top_logprobs or 0) if body.logprobs else None
    requests = [
        (prompt_ids, sampling_params(rt, body, len(prompt_ids), max_tokens, copy=j, logprobs=top))
        for j in range(body.n)
    ]
    gen = submit(rt, relays, "chatcmpl", requests)
    fmt = LogprobFormatter(rt.token_text)
    if body.stream:
        return sse(chat_chunks(gen, settings.model_name, body, fmt), rt, gen)
    results = await collect(rt, gen, request)
    choices = [
        chat_choice(j, res, fmt.chat(res.logprobs) if body.logprobs else None)
        for j, res in enumerate(results)
    ]
    used = result_usage(len(prompt_ids), results)
    response = chat_completion_response(gen.header(settings.model_name), choices, used)
    return JSONResponse(response.model_dump())
