"""The generation engine: one background thread doing continuous (iteration-level) batching.

Each iteration of the loop
1. drops requests whose client went away, freeing their KV blocks at once;
2. admits waiting requests while batch slots and KV blocks last, reusing cached blocks of a
   prompt prefix it has seen before (automatic prefix caching);
3. prefills prompt chunks of at most ``max_prefill_tokens`` tokens in one packed forward pass,
   so a long prompt is spread over several iterations instead of stalling every stream;
4. runs one decode step for every sequence whose prompt is done, each at its own position;
   when a sequence needs a new block and none is free, the most recently admitted sequence is
   preempted: its blocks are freed and it is recomputed later (its tokens so far are kept);
5. retires finished sequences immediately, so their blocks serve the next waiting request.

A sequence is simply tokens (prompt, then output) of which the first ``num_computed`` have
keys/values in the cache; prefill, decode and recompute after preemption are all "compute the
rest, sample after the last". Results go to a per-request ``sink`` callback (the API turns it
into an asyncio queue); the engine never blocks on a client.
"""

from __future__ import annotations

import itertools
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
from phalanx_serve.kv_cache import (
    Chunk,
    DecodeView,
    OutOfBlocksError,
    PackedPrefillView,
    PagedKVCache,
)
from phalanx_serve.metrics import MetricsRecorder, ServeMetrics
from phalanx_serve.model_runner import ServingModel
from phalanx_serve.sampling import (
    RowContext,
    SamplingParams,
    TokenLogprob,
    sample_next_tokens,
    token_logprobs,
)
from phalanx_trainer.model import Transformer

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
    # Prompt tokens prefilled in one iteration (the chunk size of chunked prefill); bounds the
    # prefill's activation memory and how long decoding streams wait for their next token.
    max_prefill_tokens: int = 2048
    block_size: int = 16
    # KV blocks in the cache; None: enough for max_batch_size full-length sequences.
    num_blocks: int | None = None
    prefix_caching: bool = True

    @property
    def total_blocks(self) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        return self.max_batch_size * -(-self.max_model_len // self.block_size)


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
    logprobs: list[TokenLogprob] | None = None
    # Sent once, with the first output: None for the first prompt token, then one per token.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float = 0.0


Sink = Callable[[RequestOutput], None]


@dataclass(frozen=True)
class SubmitRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink


@dataclass(eq=False)
class RequestGroup:
    """The sequences of one request (its n/best_of choices), for per-request metrics."""

    size: int
    remaining: int
    max_generation_tokens: int = 0
    first_scheduled: float | None = None


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    detokenizer: IncrementalDetokenizer
    stop_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: FinishReason | None = None
    aborted: bool = False
    # Paged-cache state: blocks in order, and how many leading tokens have keys/values there.
    table: list[int] = field(default_factory=list)
    num_computed: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    cumulative_logprob: float = 0.0
    counted_prompt: bool = False
    group: RequestGroup | None = None
    # Unique within the engine: a decode step recognises the previous step's sequences by it.
    serial: int = 0

    def __post_init__(self) -> None:
        self.matcher = StopStringMatcher(self.params.stop)
        self.generator = self.params.make_generator()
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        decoder: TokenDecoder,
        config: EngineConfig,
        metrics: ServeMetrics | MetricsRecorder,
        *,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        eos_token_ids: tuple[int, ...] = (),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        # A trainer model gets the serving forward (fused projections, logits only where read).
        self.model = ServingModel(model) if isinstance(model, Transformer) else model
        self.decoder = decoder
        self.config = config
        self.metrics = metrics
        self.eos_token_ids = eos_token_ids
        self.device = torch.device(device)
        self.cache = PagedKVCache(
            n_layers=n_layers,
            num_blocks=config.total_blocks,
            block_size=config.block_size,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            device=self.device,
            prefix_caching=config.prefix_caching,
        )
        if config.total_blocks * config.block_size < config.max_model_len:
            raise ValueError(
                f"the KV cache ({config.total_blocks} blocks of {config.block_size} tokens) "
                f"cannot hold one sequence of max_model_len {config.max_model_len} tokens"
            )
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        # Admitted sequences (prefilling or decoding), oldest first; preemption takes the last.
        self._running: list[Sequence] = []
        self._stopping = False
        self._serials = itertools.count(1)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # Called on the engine thread after every iteration (and once after the last): the
        # engine process ships a whole step's outputs in one message from here.
        self.on_step: Callable[[], None] | None = None
        log.info(
            "KV cache: %d blocks x %d tokens, %.1f MiB, prefix caching %s",
            config.total_blocks,
            config.block_size,
            self.cache.nbytes / 2**20,
            "on" if config.prefix_caching else "off",
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

    def blocks_needed(self, tokens: int) -> int:
        return self.cache.blocks.blocks_for(tokens)

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
        return self.submit_group([SubmitRequest(request_id, prompt_ids, params, sink)])[0]

    def submit_group(self, requests: list[SubmitRequest]) -> list[Sequence]:
        """Queue several sequences (the choices of one request) all together or none."""
        stop_ids = tuple(self.eos_token_ids)
        group = RequestGroup(len(requests), len(requests))
        seqs = [
            Sequence(
                r.request_id,
                r.prompt_ids,
                r.params,
                r.sink,
                IncrementalDetokenizer(self.decoder),
                stop_ids=() if r.params.ignore_eos else (*stop_ids, *r.params.stop_token_ids),
                group=group,
                serial=next(self._serials),
            )
            for r in requests
        ]
        with self._cv:
            if self._stopping or not self.alive:
                raise EngineDeadError("the generation engine is not running")
            free_slots = max(self.config.max_batch_size - len(self._running), 0)
            if len(self._waiting) + len(seqs) > self.config.max_queue + free_slots:
                raise QueueFullError(
                    f"server is at capacity ({self.config.max_batch_size} running, "
                    f"{len(self._waiting)} waiting); retry later"
                )
            self._waiting.extend(seqs)
            self.metrics.num_requests_waiting.set(len(self._waiting))
            self._cv.notify()
        return seqs

    def abort(self, seq: Sequence) -> None:
        """Stop a request whose client left; its blocks are freed at the next iteration."""
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
                    if self.on_step is not None:
                        self.on_step()
        except BaseException as exc:  # any failure leaves the KV state unknown: stop serving
            log.exception("engine loop failed; failing all requests")
            error = exc
        with self._cv:
            self.error = error
            self._stopping = True
            victims = list(dict.fromkeys([*self._running, *self._waiting]))
            for seq in self._running:
                self._release(seq)
            self._running = []
            self._waiting.clear()
        message = None if error is None else f"{type(error).__name__}: {error}"
        for seq in victims:
            out = RequestOutput("", 0, len(seq.prompt_ids), len(seq.output_ids), True, "abort")
            out.error = message or "the server is shutting down"
            self._emit(seq, out)
        self._update_gauges()
        if self.on_step is not None:
            self.on_step()

    def _iterate(self) -> bool:
        with self._cv:
            while not (self._stopping or self._waiting or self._running):
                self._cv.wait()
            if self._stopping:
                return False
            aborted_waiting = [s for s in self._waiting if s.aborted]
            for seq in aborted_waiting:
                self._waiting.remove(seq)
            self._admit()
        now = time.monotonic()
        for seq in aborted_waiting:
            self._finish(seq, "abort", now)
        for seq in [s for s in self._running if s.aborted]:
            self._retire(seq, "abort")
        decoding = self._reserve_decode_blocks()
        prefill = [s for s in self._running if s.pending > 1 and s not in decoding]
        if prefill:
            self._prefill(prefill)
        decoding = [s for s in decoding if s in self._running]
        if decoding:
            self._decode(decoding)
        self._update_gauges()
        return True

    def _admit(self) -> None:
        """Move waiting sequences into the batch while slots and blocks for their tokens last."""
        blocks = self.cache.blocks
        while self._waiting and len(self._running) < self.config.max_batch_size:
            seq = self._waiting[0]
            tokens = seq.tokens()
            # Prompt logprobs need the logits of every prompt position: nothing may be skipped.
            cached = [] if seq.needs_prompt_logprobs else blocks.lookup_prefix(tokens)
            needed = blocks.blocks_for(len(tokens)) - len(cached)
            if needed > blocks.num_available:
                blocks.release(cached)
                blocks.hits -= len(cached) * blocks.block_size
                break
            self._waiting.popleft()
            seq.table = cached + [blocks.allocate() for _ in range(needed)]
            seq.num_computed = len(cached) * blocks.block_size
            if seq.scheduled_time is None:  # first admission, not a recompute
                seq.scheduled_time = time.monotonic()
                self.metrics.prefix_cache_queries.inc(len(seq.prompt_ids))
                self.metrics.prefix_cache_hits.inc(seq.num_computed)
            self._running.append(seq)

    def _reserve_decode_blocks(self) -> list[Sequence]:
        """Give every decoding sequence room for its next token, preempting if blocks run out."""
        decoding: list[Sequence] = []
        for seq in list(self._running):
            if seq not in self._running or seq.pending != 1:
                continue
            while seq.num_computed // self.cache.block_size >= len(seq.table):
                try:
                    seq.table.append(self.cache.blocks.allocate())
                except OutOfBlocksError:
                    victim = self._running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
            if seq in self._running:
                decoding.append(seq)
        return decoding

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        self.metrics.num_preemptions.inc()
        with self._cv:
            self._waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.cache.blocks.release(seq.table)
        seq.table = []

    def _prefill(self, candidates: list[Sequence]) -> None:
        budget = self.config.max_prefill_tokens
        seqs: list[Sequence] = []
        chunks: list[Chunk] = []
        for seq in candidates:
            if budget <= 0:
                break
            n = min(seq.pending, budget)
            chunks.append(Chunk(tuple(seq.table), seq.num_computed, seq.num_computed + n))
            seqs.append(seq)
            budget -= n
        tokens = torch.tensor(
            [
                [
                    s.token(p)
                    for s, c in zip(seqs, chunks, strict=True)
                    for p in range(c.start, c.end)
                ]
            ],
            device=self.device,
        )
        # Only the rows the step reads: prompt positions that are scored, and each finished
        # prompt's last position, whose logits choose its first token.
        wanted: list[int] = []
        offset = 0
        for seq, chunk in zip(seqs, chunks, strict=True):
            if seq.needs_prompt_logprobs:
                wanted.extend(range(offset, offset + chunk.length))
            elif chunk.end == seq.num_tokens:
                wanted.append(offset + chunk.length - 1)
            offset += chunk.length
        view = PackedPrefillView(self.cache, chunks, logit_rows=wanted)
        logits = self.model(tokens, positions=view.positions(), kv_cache=view)[0]
        if logits.shape[0] != len(wanted):  # a model that ignores logit_rows
            logits = logits[wanted]
        index = {row: i for i, row in enumerate(wanted)}
        done_rows: list[int] = []
        done: list[Sequence] = []
        offset = 0
        for seq, chunk in zip(seqs, chunks, strict=True):
            if seq.needs_prompt_logprobs:
                rows = [index[r] for r in range(offset, offset + chunk.length)]
                self._add_prompt_logprobs(seq, chunk, logits[rows])
            self._computed(seq, chunk.end)
            offset += chunk.length
            if seq.pending == 0:
                done_rows.append(index[offset - 1])
                done.append(seq)
        for seq in done:
            if not seq.counted_prompt:
                seq.counted_prompt = True
                self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        now = time.monotonic()
        scoring = [s for s in done if s.params.max_tokens == 0]
        for seq in scoring:  # prompt scoring only (echo with max_tokens 0): nothing to sample
            self._retire(seq, None, self._final_output(seq, "length", now))
        keep = [i for i, s in enumerate(done) if s.params.max_tokens > 0]
        if keep:
            self._sample([done[i] for i in keep], logits[[done_rows[i] for i in keep]])

    def _add_prompt_logprobs(self, seq: Sequence, chunk: Chunk, logits: torch.Tensor) -> None:
        """Logits at prompt position p score prompt token p + 1."""
        assert seq.prompt_logprobs is not None
        assert seq.params.prompt_logprobs is not None
        # After a preemption the prompt is recomputed; positions already scored are skipped.
        first = max(chunk.start, len(seq.prompt_logprobs) - 1)
        last = min(chunk.end, len(seq.prompt_ids) - 1)
        if last <= first:
            return
        targets = [seq.prompt_ids[p + 1] for p in range(first, last)]
        k = seq.params.prompt_logprobs
        rows = logits[first - chunk.start : last - chunk.start]
        scored = token_logprobs(rows, targets, [k] * len(targets))
        seq.prompt_logprobs.extend(scored)

    def _computed(self, seq: Sequence, upto: int) -> None:
        bs = self.cache.block_size
        before = seq.num_computed // bs
        seq.num_computed = upto
        if upto // bs > before:
            self.cache.blocks.register(seq.table, seq.tokens(), upto)

    def _decode(self, seqs: list[Sequence]) -> None:
        tokens = torch.tensor([[s.token(s.num_computed)] for s in seqs], device=self.device)
        view = DecodeView(
            self.cache,
            [s.table for s in seqs],
            [s.num_computed for s in seqs],
            tuple(s.serial for s in seqs),
        )
        logits = self.model(tokens, positions=view.positions(), kv_cache=view)[:, -1]
        for seq in seqs:
            self._computed(seq, seq.num_computed + 1)
        self._sample(seqs, logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        params = [s.params for s in seqs]
        contexts = [RowContext(s.prompt_ids, s.output_ids, s.stop_ids) for s in seqs]
        next_tokens = sample_next_tokens(logits, params, [s.generator for s in seqs], contexts)
        scored = [i for i, p in enumerate(params) if p.needs_logprob]
        lps: dict[int, TokenLogprob] = {}
        if scored:
            tops = [params[i].logprobs or 0 for i in scored]
            picked = [next_tokens[i] for i in scored]
            for i, lp in zip(scored, token_logprobs(logits[scored], picked, tops), strict=True):
                lps[i] = lp
        now = time.monotonic()
        finished: list[tuple[Sequence, RequestOutput]] = []
        for i, (seq, token) in enumerate(zip(seqs, next_tokens, strict=True)):
            out = self._append_token(seq, token, lps.get(i), now)
            if out.finished:
                finished.append((seq, out))
            else:
                self._emit(seq, out)
        self.metrics.generation_tokens.inc(len(next_tokens))
        for seq, out in finished:
            self._retire(seq, None, out)

    def _append_token(
        self, seq: Sequence, token: int, lp: TokenLogprob | None, now: float
    ) -> RequestOutput:
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.time_to_first_token.observe(now - seq.arrival_time)
        elif seq.last_token_time is not None:
            self.metrics.inter_token_latency.observe(now - seq.last_token_time)
        seq.last_token_time = now
        seq.output_ids.append(token)
        if lp is not None:
            seq.cumulative_logprob += lp.logprob
        params = seq.params
        # Stop strings, like end-of-sequence tokens, only count once min_tokens are out.
        may_stop = len(seq.output_ids) > params.min_tokens
        reason: FinishReason | None = None
        if token in seq.stop_ids and may_stop:
            reason = "stop"
            text = seq.matcher.add(seq.detokenizer.flush())
        else:
            text = seq.matcher.add(seq.detokenizer.push(token), check=may_stop)
            if seq.matcher.stopped:
                reason = "stop"
            elif (
                len(seq.output_ids) >= params.max_tokens
                or seq.num_tokens >= self.config.max_model_len
            ):
                text += seq.matcher.add(seq.detokenizer.flush())
                reason = "stop" if seq.matcher.stopped else "length"
        if reason is not None:
            text += seq.matcher.finish()
            seq.finish_reason = reason
        out = RequestOutput(
            text=text,
            num_new_tokens=1,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            finished=reason is not None,
            finish_reason=reason,
            logprobs=[lp] if lp is not None and params.logprobs is not None else None,
            cumulative_logprob=seq.cumulative_logprob,
        )
        self._attach_prompt_logprobs(seq, out)
        return out

    def _attach_prompt_logprobs(self, seq: Sequence, out: RequestOutput) -> None:
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            out.prompt_logprobs = seq.prompt_logprobs
            seq.prompt_logprobs_sent = True

    def _final_output(self, seq: Sequence, reason: FinishReason, now: float) -> RequestOutput:
        seq.finish_reason = reason
        out = RequestOutput(
            "", 0, len(seq.prompt_ids), len(seq.output_ids), True, reason,
            cumulative_logprob=seq.cumulative_logprob,
        )  # fmt: skip
        if reason != "abort":
            self._attach_prompt_logprobs(seq, out)
        return out

    def _retire(
        self, seq: Sequence, reason: FinishReason | None, out: RequestOutput | None = None
    ) -> None:
        """Remove a running sequence, free its blocks and send its last output."""
        now = time.monotonic()
        self._running.remove(seq)
        self._release(seq)
        if out is None:
            out = self._final_output(seq, reason or "abort", now)
        self._emit(seq, out)
        self._record_finished(seq, now)

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        self._emit(seq, self._final_output(seq, reason, now))
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
        group = seq.group
        if group is not None:
            group.remaining -= 1
            group.max_generation_tokens = max(group.max_generation_tokens, len(seq.output_ids))
            if seq.scheduled_time is not None:
                first = group.first_scheduled
                group.first_scheduled = (
                    seq.scheduled_time if first is None else min(first, seq.scheduled_time)
                )
            if group.remaining == 0:
                start = group.first_scheduled if group.first_scheduled is not None else now
                m.group_finished(group.size, group.max_generation_tokens, now - start)

    def _emit(self, seq: Sequence, out: RequestOutput) -> None:
        try:
            seq.sink(out)
        except Exception:  # a client's sink must never take the engine down
            log.exception("dropping output of request %s", seq.request_id)

    def _update_gauges(self) -> None:
        self.metrics.num_requests_running.set(len(self._running))
        self.metrics.num_requests_waiting.set(len(self._waiting))
        self.metrics.kv_cache_usage_perc.set(self.cache.usage)
