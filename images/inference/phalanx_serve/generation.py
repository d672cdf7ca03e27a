"""Handing a request's sequences to the engine and getting their outputs back onto the event
loop: submit (429 when the queue is full), collect (abort everything when the client goes), and
the relay that wakes the loop once per engine step."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from phalanx_serve.engine import (
    EngineDeadError,
    QueueFullError,
    RequestOutput,
    Sequence,
    SubmitRequest,
)
from phalanx_serve.engine_process import EngineClient, RemoteSequence
from phalanx_serve.errors import APIError, bad_request
from phalanx_serve.responses import ResponseHeader, SequenceResult
from phalanx_serve.runtime import ServerRuntime
from phalanx_serve.sampling import SamplingParams


@dataclass
class Generation:
    """The sequences of one request handed to the engine, and the queue their outputs share."""

    seqs: list[Sequence] | list[RemoteSequence]
    outputs: asyncio.Queue[tuple[int, RequestOutput] | None]
    request_id: str
    created: int

    def header(self, model: str) -> ResponseHeader:
        return ResponseHeader(self.request_id, self.created, model)


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


# One relay per event loop serving an app (in practice one).
Relays = dict[asyncio.AbstractEventLoop, OutputRelay]


def submit(
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
    request_id = rt.request_id(prefix)

    relay = relays.get(loop)
    if relay is None:
        relay = relays[loop] = OutputRelay(loop)

    on_loop = isinstance(rt.engine, EngineClient)  # its outputs are delivered on this loop

    def sink_for(index: int) -> Callable[[RequestOutput], None]:
        if on_loop:
            return lambda out: outputs.put_nowait((index, out))

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


def abort(rt: ServerRuntime, gen: Generation) -> None:
    engine = rt.engine
    if isinstance(engine, EngineClient):
        for remote in gen.seqs:
            assert isinstance(remote, RemoteSequence)
            engine.abort(remote)
    elif engine is not None:
        for seq in gen.seqs:
            assert isinstance(seq, Sequence)
            engine.abort(seq)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(rt: ServerRuntime, gen: Generation, request: Request) -> list[SequenceResult]:
    """Wait for every sequence to finish; abort them all if the client disconnects meanwhile."""
    disconnect = asyncio.create_task(_wait_for_disconnect(request))

    def on_disconnect(task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            abort(rt, gen)
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
        abort(rt, gen)


def _accumulate(res: SequenceResult, out: RequestOutput) -> None:
    res.completion_tokens = out.completion_tokens
    res.cumulative_logprob = out.cumulative_logprob
    if out.logprobs:
        res.logprobs.extend(out.logprobs)
    if out.prompt_logprobs is not None:
        res.prompt_logprobs = out.prompt_logprobs
    if out.finished:
        res.finish_reason = out.finish_reason
