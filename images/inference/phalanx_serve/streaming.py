"""Server-sent events: the chunks of a streamed completion or chat completion, in OpenAI's
order, ending with ``data: [DONE]``. A client that falls behind gets fewer, larger chunks; one
that disconnects has its sequences aborted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from phalanx_serve.engine import RequestOutput
from phalanx_serve.generation import Generation, abort
from phalanx_serve.protocol import ChatCompletionRequest, ChatDelta, CompletionRequest
from phalanx_serve.responses import (
    Entry,
    LogprobFormatter,
    StreamChunks,
    generated_entries,
    prompt_entries,
    sse_event,
    stream_error,
)
from phalanx_serve.runtime import ServerRuntime

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = b"data: [DONE]\n\n"

# A chunk, or an event already written (``StreamChunks.completion_event``).
Chunk = dict[str, Any] | bytes


def sse(chunks: AsyncIterator[Chunk], rt: ServerRuntime, gen: Generation) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk if isinstance(chunk, bytes) else sse_event(chunk)
            yield DONE_EVENT
        finally:
            # Runs when the client disconnects too (the response task is cancelled).
            abort(rt, gen)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


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


def _stream_chunks(
    gen: Generation, model: str, body: CompletionRequest | ChatCompletionRequest
) -> StreamChunks:
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamChunks(gen.header(model), include_usage)


def _stream_error(out: RequestOutput) -> dict[str, Any]:
    return stream_error(f"generation failed: {out.error}")


async def completion_chunks(
    gen: Generation,
    model: str,
    body: CompletionRequest,
    echoes: list[str],
    prompts: list[tuple[list[int], str]],
    fmt: LogprobFormatter,
) -> AsyncIterator[Chunk]:
    chunks = _stream_chunks(gen, model, body)
    n = body.n  # streaming requires best_of == n, so sequence k is choice k
    offsets = [0] * len(gen.seqs)
    tokens = [0] * len(gen.seqs)
    want_logprobs = body.logprobs is not None
    for k in range(len(gen.seqs)):
        echo = echoes[k // n]
        if echo and not (body.echo and want_logprobs):
            yield chunks.completion(k, echo, None, None)
    async for k, out in _outputs(gen):
        if out.error is not None:
            yield _stream_error(out)
            return
        tokens[k] = out.completion_tokens
        text = out.text
        if not want_logprobs:
            if text or out.finished:
                yield chunks.completion_event(k, text, out.finish_reason if out.finished else None)
            continue
        entries: list[Entry] = []
        if out.prompt_logprobs is not None and body.echo:
            entries = prompt_entries(prompts[k // n][0], out.prompt_logprobs)
            text = echoes[k // n] + text
        entries += generated_entries(out.logprobs or [])
        lp = fmt.completion(entries, offsets[k])
        offsets[k] += sum(len(t) for t in lp.tokens)
        yield chunks.completion(k, text, lp, out.finish_reason if out.finished else None)
    if chunks.include_usage:
        yield chunks.completion_usage(sum(len(ids) for ids, _ in prompts), sum(tokens))


async def chat_chunks(
    gen: Generation, model: str, body: ChatCompletionRequest, fmt: LogprobFormatter
) -> AsyncIterator[dict[str, Any]]:
    chunks = _stream_chunks(gen, model, body)
    tokens = [0] * len(gen.seqs)
    prompt_tokens = len(gen.seqs[0].prompt_ids)
    for k in range(len(gen.seqs)):
        yield chunks.chat(k, ChatDelta(role="assistant", content=""), None, None)
    async for k, out in _outputs(gen):
        if out.error is not None:
            yield _stream_error(out)
            return
        tokens[k] = out.completion_tokens
        lp = fmt.chat(out.logprobs) if body.logprobs and out.logprobs else None
        if out.text or lp is not None:
            yield chunks.chat(k, ChatDelta(content=out.text), lp, None)
        if out.finished:
            yield chunks.chat(k, ChatDelta(), None, out.finish_reason)
    if chunks.include_usage:
        yield chunks.chat_usage(prompt_tokens, sum(tokens))
