"""The engine in a process of its own (``phalanx-serve --engine-process true``).

In one process the engine thread and the HTTP event loop share the GIL: every request parsed and
every chunk streamed is time the decode loop does not run, and each hand-over of the GIL can
wait out the interpreter's switch interval. As vLLM's V1 engine core does, the engine here runs
in a child process (``spawn``), which loads the weights, owns the KV cache and runs the loop of
``engine.Engine`` unchanged; the server process keeps the HTTP API, tokenization, request
checks and streaming. They talk over one pipe (pickled tuples):

* server -> engine: ``("submit", [(request_id, prompt_ids, params), ...])`` (the sequences of
  one request, all or none), ``("abort", [request_id, ...])``, ``("stop",)``;
* engine -> server: ``("ready", max_model_len)`` or ``("failed", message)`` once, then one
  ``("step", outputs, metric_updates)`` per engine iteration, carrying every sequence's output of
  that step and the metric updates it made (replayed on the server's registry, so ``/metrics``
  is unchanged), and ``("dead", message)`` if the loop stopped.

The server reads the pipe on its event loop (``add_reader``): no thread of its own, and a step's
outputs reach the streams' queues in one callback. Admission control stays synchronous: the
server counts its unfinished sequences and answers 429 itself at the same limit the engine
enforces (running + waiting <= max_batch_size + max_queue).

Failure: if the loop raises, every sequence gets its error output and the process exits; if the
process dies without a word (killed, out of memory), the server sees the pipe close. Either way
``alive`` turns false, so ``/health`` answers 503, every unfinished request ends with an error
(a 503 body, or an error event on a stream) and new requests get a 503; nothing hangs. When the
server stops it sends ``stop`` and joins the process; if the server dies first, the engine
process sees its pipe close and exits too. On a group's leader the engine process is the one
that joins the tensor-parallel group and drives the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from phalanx_serve.engine import (
    Engine,
    EngineDeadError,
    QueueFullError,
    RequestOutput,
    Sequence,
    Sink,
    SubmitRequest,
)
from phalanx_serve.metrics import MetricsRecorder, ServeMetrics, replay
from phalanx_serve.settings import ServerSettings

log = logging.getLogger(__name__)

# How long the engine process may take to load and warm up before the server gives up.
START_TIMEOUT_S = 900.0
# One output on the wire: request id, then RequestOutput's fields in order.
WireOutput = tuple[Any, ...]


def _to_wire(request_id: str, out: RequestOutput) -> WireOutput:
    return (
        request_id, out.text, out.num_new_tokens, out.prompt_tokens, out.completion_tokens,
        out.finished, out.finish_reason, out.error, out.logprobs, out.prompt_logprobs,
        out.cumulative_logprob,
    )  # fmt: skip


@dataclass(eq=False)
class RemoteSequence:
    """The server's handle of a sequence running in the engine process."""

    request_id: str
    prompt_ids: list[int]
    sink: Sink
    finish_reason: str | None = None
    finished: bool = field(default=False)


class EngineClient:
    """The engine's interface as the HTTP layer uses it (``submit_group``, ``abort``,
    ``alive``, ``shutdown``), backed by the engine process."""

    def __init__(
        self,
        settings: ServerSettings,
        metrics: ServeMetrics,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        if loop is None:
            raise RuntimeError("the engine process needs the event loop that serves the app")
        self.settings = settings
        self.metrics = metrics
        self.loop: asyncio.AbstractEventLoop = loop
        self.capacity = settings.max_batch_size + settings.max_queue
        self.error: str | None = None
        self.max_model_len = 0
        self._seqs: dict[str, RemoteSequence] = {}
        self._send_lock = threading.Lock()
        self._closed = False
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._child_conn: Connection | None = child
        self.process = ctx.Process(
            target=engine_main, args=(child, settings), name="phalanx-engine", daemon=True
        )

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine process and wait until its engine is warmed up (or failed)."""
        self.process.start()
        assert self._child_conn is not None
        self._child_conn.close()  # only the child holds its end: its death closes the pipe
        self._child_conn = None
        if not self._conn.poll(START_TIMEOUT_S):
            self.process.kill()
            raise TimeoutError(f"the engine process did not start within {START_TIMEOUT_S} s")
        try:
            message = self._conn.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise RuntimeError(
                f"the engine process exited (code {self.process.exitcode}) while loading"
            ) from None
        if message[0] == "failed":
            self.process.join(timeout=10)
            raise RuntimeError(message[1])
        assert message[0] == "ready", message
        self.max_model_len = message[1]
        self.loop.call_soon_threadsafe(self._watch)

    def _watch(self) -> None:
        self.loop.add_reader(self._conn.fileno(), self._on_readable)

    @property
    def alive(self) -> bool:
        return self.error is None and not self._closed and self.process.is_alive()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        with contextlib.suppress(OSError):
            self._send(("stop",))
        self.process.join(timeout=15)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self._conn.close()
        self._fail_all("the server is shutting down")

    # -- the engine interface -----------------------------------------------------------------

    @property
    def num_unfinished(self) -> int:
        return len(self._seqs)

    def submit_group(self, requests: list[SubmitRequest]) -> list[RemoteSequence]:
        if not self.alive:
            raise EngineDeadError(
                "the generation engine is not running" + (f": {self.error}" if self.error else "")
            )
        unfinished = len(self._seqs)
        if unfinished + len(requests) > self.capacity:
            running = min(unfinished, self.settings.max_batch_size)
            raise QueueFullError(
                f"server is at capacity ({running} running, {unfinished - running} waiting); "
                "retry later"
            )
        seqs = [RemoteSequence(r.request_id, r.prompt_ids, r.sink) for r in requests]
        for seq in seqs:
            self._seqs[seq.request_id] = seq
        try:
            self._send(("submit", [(r.request_id, r.prompt_ids, r.params) for r in requests]))
        except OSError as exc:
            for seq in seqs:
                self._seqs.pop(seq.request_id, None)
            raise EngineDeadError(f"the generation engine is not running: {exc}") from exc
        return seqs

    def abort(self, seq: RemoteSequence) -> None:
        if seq.finished or not self.alive:
            return
        with contextlib.suppress(OSError):
            self._send(("abort", [seq.request_id]))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    # -- outputs, on the event loop -------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                message = self._conn.recv()
                if message[0] == "step":
                    self._deliver(message[1])
                    replay(self.metrics, message[2])
                elif message[0] == "dead":
                    self._died(message[1])
                    return
        except (EOFError, OSError):
            code = self.process.exitcode
            self._died(f"the engine process exited (code {code})")

    def _deliver(self, outputs: list[WireOutput]) -> None:
        for rid, *fields in outputs:
            seq = self._seqs.get(rid)
            if seq is None:
                continue
            out = RequestOutput(*fields)
            if out.finished:
                seq.finished = True
                seq.finish_reason = out.finish_reason
                del self._seqs[rid]
            try:
                seq.sink(out)
            except Exception:  # one stream's failure must not starve the others
                log.exception("dropping output of request %s", rid)

    def _died(self, message: str) -> None:
        if self.error is None:
            self.error = message
            log.error("engine process stopped: %s", message)
        self._unwatch()
        self._fail_all(message)

    def _unwatch(self) -> None:
        if self.loop.is_closed() or self._conn.closed:
            return
        with contextlib.suppress(RuntimeError, ValueError, OSError):
            self.loop.remove_reader(self._conn.fileno())

    def _fail_all(self, message: str) -> None:
        seqs, self._seqs = list(self._seqs.values()), {}
        for seq in seqs:
            seq.finished = True
            seq.finish_reason = "abort"
            out = RequestOutput("", 0, len(seq.prompt_ids), 0, True, "abort", error=message)
            try:
                seq.sink(out)
            except Exception:
                log.exception("dropping output of request %s", seq.request_id)


# -- the engine process ------------------------------------------------------------------------


class _StepSender:
    """Collects a step's outputs on the engine thread and sends them as one message."""

    def __init__(self, conn: Connection, recorder: MetricsRecorder) -> None:
        self.conn = conn
        self.recorder = recorder
        self.lock = threading.Lock()
        self.outputs: list[WireOutput] = []
        # Unfinished sequences by request id, for aborts.
        self.live: dict[str, Sequence] = {}

    def sink_for(self, request_id: str) -> Sink:
        outputs, live = self.outputs, self.live

        def sink(out: RequestOutput) -> None:
            outputs.append(_to_wire(request_id, out))
            if out.finished:
                live.pop(request_id, None)

        return sink

    def flush(self) -> None:
        taken = self.outputs[:]
        del self.outputs[: len(taken)]
        updates = self.recorder.take()
        if taken or updates:
            self.send(("step", taken, updates))

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(message)


def engine_main(conn: Connection, settings: ServerSettings) -> None:
    """Entry point of the engine process."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s",
    )
    import signal

    import torch

    from phalanx_serve.group import send_stop
    from phalanx_serve.runtime import build_engine, warm_up

    # Ctrl-C reaches the whole process group: the server process orchestrates the stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    recorder = MetricsRecorder()
    try:
        built = build_engine(settings, recorder)
        engine = built.engine
        engine.start()
        warm_up(engine)
    except Exception as exc:
        log.exception("loading %s failed", settings.model)
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    recorder.take()  # the warm-up is not traffic
    sender = _StepSender(conn, recorder)
    engine.on_step = sender.flush
    sender.send(("ready", built.max_len))
    log.info("engine process ready (%d torch threads)", torch.get_num_threads())
    stop_group = True
    try:
        while engine.alive:
            if not conn.poll(0.5):
                continue
            message = conn.recv()
            kind = message[0]
            if kind == "submit":
                _submit(engine, sender, message[1])
            elif kind == "abort":
                for rid in message[1]:
                    seq = sender.live.get(rid)
                    if seq is not None:
                        engine.abort(seq)
            elif kind == "stop":
                break
    except (EOFError, OSError):
        log.warning("the server process went away; stopping the engine")
    if not engine.alive:
        stop_group = False  # a broken loop leaves the group's collectives in an unknown state
        error = engine.error
        message = "the engine loop stopped" if error is None else f"{type(error).__name__}: {error}"
        with contextlib.suppress(OSError):
            sender.send(("dead", message))
    engine.shutdown()
    if built.comm is not None:
        if stop_group:
            send_stop(built.comm)
        built.comm.close()
    if not stop_group:
        raise SystemExit(1)


def _submit(engine: Engine, sender: _StepSender, requests: list[tuple[Any, ...]]) -> None:
    group = [SubmitRequest(rid, ids, params, sender.sink_for(rid)) for rid, ids, params in requests]
    try:
        for seq in engine.submit_group(group):
            sender.live.setdefault(seq.request_id, seq)
    except (QueueFullError, EngineDeadError) as exc:
        # The server checks capacity first; this is the rare race with a finishing step.
        for r in group:
            r.sink(RequestOutput("", 0, len(r.prompt_ids), 0, True, "abort", error=str(exc)))
        sender.flush()
