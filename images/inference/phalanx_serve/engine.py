"""The generation engine: one background thread doing continuous (iteration-level) batching.

Each iteration of the loop
1. drops requests whose client went away, freeing their KV slots at once;
2. admits waiting requests into free slots and prefills their prompts in one packed forward
   pass (no padding), sampling each one's first token;
3. runs one decode step for every running sequence together, each at its own position;
4. retires finished sequences immediately, so their slots serve the next waiting request.

Requests therefore join and leave the batch between decode steps instead of waiting for the
whole batch to drain. Results go to a per-request ``sink`` callback (the API turns it into an
asyncio queue); the engine never blocks on a client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from phalanx_serve.detokenizer import IncrementalDetokenizer, StopStringMatcher, TokenDecoder
from phalanx_serve.kv_cache import DecodeView, PackedPrefillView, Segment, SlotKVCache
from phalanx_serve.metrics import ServeMetrics
from phalanx_serve.sampling import SamplingParams, sample_next_tokens

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]


class QueueFullError(Exception):
    """Every batch slot is busy and the waiting queue is at its limit."""


class EngineDeadError(Exception):
    """The engine loop stopped after an internal error; the process should be restarted."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    max_model_len: int = 2048
    max_queue: int = 64
    # Prompt tokens prefilled together in one iteration; bounds the prefill's activation memory
    # and how long running sequences wait for their next token while newcomers prefill.
    max_prefill_tokens: int = 2048


@dataclass
class RequestOutput:
    """What a request gained in one engine step."""

    text: str
    num_new_tokens: int
    prompt_tokens: int
    completion_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None


Sink = Callable[[RequestOutput], None]


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    detokenizer: IncrementalDetokenizer
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: FinishReason | None = None
    aborted: bool = False

    def __post_init__(self) -> None:
        self.matcher = StopStringMatcher(self.params.stop)
        self.generator = self.params.make_generator()


class Engine:
    def __init__(
        self,
        model: nn.Module,
        decoder: TokenDecoder,
        config: EngineConfig,
        metrics: ServeMetrics,
        *,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        eos_token_ids: tuple[int, ...] = (),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.decoder = decoder
        self.config = config
        self.metrics = metrics
        self.eos_token_ids = eos_token_ids
        self.device = torch.device(device)
        self.cache = SlotKVCache(
            n_layers=n_layers,
            max_slots=config.max_batch_size,
            n_kv_heads=n_kv_heads,
            max_len=config.max_model_len,
            head_dim=head_dim,
            dtype=dtype,
            device=self.device,
        )
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        # Sequence i of the running batch lives in KV slot i (see kv_cache.py).
        self._running: list[Sequence] = []
        # Taken from the queue but not yet in the batch (their prefill is running).
        self._prefilling: list[Sequence] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        log.info(
            "KV cache: %d slots x %d tokens, %.1f MiB",
            config.max_batch_size,
            config.max_model_len,
            self.cache.nbytes / 2**20,
        )

    # -- called from the API threads -------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="phalanx-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink
    ) -> Sequence:
        seq = Sequence(request_id, prompt_ids, params, sink, IncrementalDetokenizer(self.decoder))
        with self._cv:
            if self._stopping or not self.alive:
                raise EngineDeadError("the generation engine is not running")
            free_slots = self.config.max_batch_size - len(self._running)
            if len(self._waiting) >= self.config.max_queue + max(free_slots, 0):
                raise QueueFullError(
                    f"server is at capacity ({self.config.max_batch_size} running, "
                    f"{len(self._waiting)} waiting); retry later"
                )
            self._waiting.append(seq)
            self.metrics.num_requests_waiting.set(len(self._waiting))
            self._cv.notify()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request whose client left; its slot is freed at the next iteration."""
        if seq.finish_reason is None:
            seq.aborted = True
            with self._cv:
                self._cv.notify()

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                while self._iterate():
                    pass
        except BaseException as exc:  # any failure leaves the KV state unknown: stop serving
            log.exception("engine loop failed; failing all requests")
            error = exc
        with self._cv:
            self.error = error
            self._stopping = True
            victims = list(dict.fromkeys([*self._prefilling, *self._running, *self._waiting]))
            self._prefilling, self._running = [], []
            self._waiting.clear()
            for slot in range(self.cache.max_slots):
                self.cache.free(slot)
        message = None if error is None else f"{type(error).__name__}: {error}"
        for seq in victims:
            out = RequestOutput("", 0, len(seq.prompt_ids), len(seq.output_ids), True, "abort")
            out.error = message or "the server is shutting down"
            self._emit(seq, out)
        self._update_gauges()

    def _iterate(self) -> bool:
        with self._cv:
            while not (self._stopping or self._waiting or self._running):
                self._cv.wait()
            if self._stopping:
                return False
            aborted_waiting = [s for s in self._waiting if s.aborted]
            for seq in aborted_waiting:
                self._waiting.remove(seq)
            admitted = self._prefilling = self._admit()
        now = time.monotonic()
        for seq in aborted_waiting:
            self._finish(seq, "abort", now)
        self._retire([i for i, s in enumerate(self._running) if s.aborted], "abort")
        if admitted:
            self._prefill(admitted)
        if self._running:
            self._decode()
        self._update_gauges()
        return True

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.config.max_prefill_tokens
        while self._waiting and len(self._running) + len(admitted) < self.config.max_batch_size:
            n = len(self._waiting[0].prompt_ids)
            if admitted and n > budget:
                break
            admitted.append(self._waiting.popleft())
            budget -= n
        return admitted

    def _prefill(self, admitted: list[Sequence]) -> None:
        now = time.monotonic()
        segments: list[Segment] = []
        start = 0
        for j, seq in enumerate(admitted):
            seq.scheduled_time = now
            segments.append(
                Segment(slot=len(self._running) + j, start=start, length=len(seq.prompt_ids))
            )
            start += len(seq.prompt_ids)
        tokens = torch.tensor([[t for s in admitted for t in s.prompt_ids]], device=self.device)
        view = PackedPrefillView(self.cache, segments)
        logits = self.model(tokens, positions=view.positions(), kv_cache=view)
        last = torch.tensor([s.start + s.length - 1 for s in segments], device=self.device)
        next_tokens = sample_next_tokens(
            logits[0, last], [s.params for s in admitted], [s.generator for s in admitted]
        )
        view.commit()
        self._running.extend(admitted)
        self._prefilling = []
        self.metrics.prompt_tokens.inc(start)
        self._accept_tokens(len(self._running) - len(admitted), next_tokens)

    def _decode(self) -> None:
        running = self._running
        tokens = torch.tensor([[s.output_ids[-1]] for s in running], device=self.device)
        view = DecodeView(self.cache, len(running))
        logits = self.model(tokens, positions=view.positions(), kv_cache=view)
        next_tokens = sample_next_tokens(
            logits[:, -1], [s.params for s in running], [s.generator for s in running]
        )
        view.commit()
        self._accept_tokens(0, next_tokens)

    def _accept_tokens(self, first_index: int, next_tokens: list[int]) -> None:
        """Append the sampled tokens to running[first_index:], emit text, retire finished."""
        now = time.monotonic()
        finished: list[int] = []
        for offset, token in enumerate(next_tokens):
            i = first_index + offset
            seq = self._running[i]
            out = self._append_token(seq, token, now)
            self._emit(seq, out)
            if out.finished:
                finished.append(i)
        self.metrics.generation_tokens.inc(len(next_tokens))
        self._retire(finished, None)

    def _append_token(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.time_to_first_token.observe(now - seq.arrival_time)
        elif seq.last_token_time is not None:
            self.metrics.inter_token_latency.observe(now - seq.last_token_time)
        seq.last_token_time = now
        seq.output_ids.append(token)
        params = seq.params
        reason: FinishReason | None = None
        if not params.ignore_eos and (
            token in self.eos_token_ids or token in params.stop_token_ids
        ):
            reason = "stop"
            text = seq.matcher.add(seq.detokenizer.flush())
        else:
            text = seq.matcher.add(seq.detokenizer.push(token))
            if seq.matcher.stopped:
                reason = "stop"
            elif (
                len(seq.output_ids) >= params.max_tokens
                or len(seq.prompt_ids) + len(seq.output_ids) >= self.config.max_model_len
            ):
                text += seq.matcher.add(seq.detokenizer.flush())
                reason = "stop" if seq.matcher.stopped else "length"
        if reason is not None:
            text += seq.matcher.finish()
            seq.finish_reason = reason
        return RequestOutput(
            text=text,
            num_new_tokens=1,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            finished=reason is not None,
            finish_reason=reason,
        )

    def _retire(self, indices: list[int], reason: FinishReason | None) -> None:
        """Remove running[indices] and keep the batch packed in slots 0..n-1."""
        now = time.monotonic()
        # Highest index first: whatever sits last is then always a sequence that stays.
        for i in sorted(indices, reverse=True):
            seq = self._running[i]
            last = len(self._running) - 1
            if i != last:
                self.cache.move(last, i)
            else:
                self.cache.free(i)
            self._running[i] = self._running[last]
            self._running.pop()
            if reason is not None:
                self._finish(seq, reason, now)
            else:
                self._record_finished(seq, now)

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        seq.finish_reason = reason
        self._emit(
            seq,
            RequestOutput("", 0, len(seq.prompt_ids), len(seq.output_ids), True, reason),
        )
        self._record_finished(seq, now)

    def _record_finished(self, seq: Sequence, now: float) -> None:
        m = self.metrics
        m.request_finished(seq.finish_reason or "abort")
        m.e2e_request_latency.observe(now - seq.arrival_time)
        if seq.scheduled_time is not None:
            m.request_queue_time.observe(seq.scheduled_time - seq.arrival_time)
        if seq.first_token_time is not None and seq.scheduled_time is not None:
            m.request_prefill_time.observe(seq.first_token_time - seq.scheduled_time)
        if seq.first_token_time is not None and seq.last_token_time is not None:
            m.request_decode_time.observe(seq.last_token_time - seq.first_token_time)
        m.request_prompt_tokens.observe(len(seq.prompt_ids))
        m.request_generation_tokens.observe(len(seq.output_ids))

    def _emit(self, seq: Sequence, out: RequestOutput) -> None:
        try:
            seq.sink(out)
        except Exception:  # a client's sink must never take the engine down
            log.exception("dropping output of request %s", seq.request_id)

    def _update_gauges(self) -> None:
        self.metrics.num_requests_running.set(len(self._running))
        self.metrics.num_requests_waiting.set(len(self._waiting))
        self.metrics.kv_cache_usage_perc.set(self.cache.usage)
