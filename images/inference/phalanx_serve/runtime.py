"""What the API needs at run time: the loaded model and engine, built in the background.

The HTTP server starts listening at once so probes get an answer (503) while weights load;
``ready`` becomes true only after a warm-up generation went through the real engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from phalanx_serve.chat_template import ChatTemplate
from phalanx_serve.engine import Engine, EngineConfig, RequestOutput
from phalanx_serve.group import GroupComm, attach_leader, send_cache_layout, send_stop
from phalanx_serve.loader import LoadedModel, load_model
from phalanx_serve.metrics import MetricsRecorder, ServeMetrics
from phalanx_serve.model_runner import ServingModel
from phalanx_serve.sampling import SamplingParams
from phalanx_serve.settings import ServerSettings
from phalanx_trainer.model import Transformer

if TYPE_CHECKING:
    from phalanx_serve.engine_process import EngineClient

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed"]

# The interpreter's switch interval with the engine loop as a thread of this process. The engine
# lets the GIL go during every torch operation and needs it back tens of microseconds later; at
# Python's default (5 ms) it then waits out the event loop's whole burst of stream chunks, so the
# two run one after the other. At 0.5 ms the event loop's Python overlaps the engine's torch work.
ENGINE_THREAD_SWITCH_INTERVAL_S = 0.0005


@dataclass
class ServerRuntime:
    settings: ServerSettings
    metrics: ServeMetrics
    status: Status = "loading"
    error: str | None = None
    loaded: LoadedModel | None = None
    # The engine in this process, or the client of the engine process (--engine-process).
    engine: Engine | EngineClient | None = None
    # The event loop serving the app (set at startup): the engine process's outputs are read there.
    loop: asyncio.AbstractEventLoop | None = None
    chat_template: ChatTemplate | None = None
    max_model_len: int = 0
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)
    # Request ids: a random stem drawn once and a counter, so that a request costs no system
    # call for its id (in the engine-thread mode every one is a chance to lose the GIL).
    _id_stem: str = field(default_factory=lambda: uuid.uuid4().hex[:16], repr=False)
    _id_count: Iterator[int] = field(default_factory=itertools.count, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _comm: GroupComm | None = field(default=None, repr=False)

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.engine is not None and self.engine.alive

    def health(self) -> str:
        if self.status == "ready" and not self.ready:
            return "engine stopped"
        return self.status

    def request_id(self, prefix: str) -> str:
        """A new id, unique to this server, such as ``cmpl-<32 hex digits>``."""
        return f"{prefix}-{self._id_stem}{next(self._id_count):016x}"

    def token_text(self, token: int) -> str:
        """One token's text, as logprobs report it (special tokens included)."""
        text = self._token_texts.get(token)
        if text is None:
            assert self.loaded is not None
            text = self.loaded.tokenizer.decode([token], skip_special_tokens=False)
            self._token_texts[token] = text
        return text

    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="phalanx-loader", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self._comm is not None:
            if self.engine is not None and self.engine.error is None:
                send_stop(self._comm)
            self._comm.close()
            self._comm = None

    def _load(self) -> None:
        try:
            self._load_and_warm_up()
        except Exception as exc:
            log.exception("loading %s failed", self.settings.model)
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = "failed"

    def _load_and_warm_up(self) -> None:
        s = self.settings
        if s.engine_process:
            from phalanx_serve.engine_process import EngineClient

            # This process keeps the tokenizer (to tokenize and check requests); the weights,
            # the KV cache and the loop live in the engine process.
            loaded = load_model(s.model, device=s.device, dtype=s.dtype, weights=False)
            client = EngineClient(s, self.metrics, self.loop)
            client.start()  # waits until that process loaded and warmed up its engine
            self.chat_template = ChatTemplate.resolve(s.chat_template, loaded.chat_template)
            self.loaded, self.engine, self.max_model_len = loaded, client, client.max_model_len
        else:
            sys.setswitchinterval(ENGINE_THREAD_SWITCH_INTERVAL_S)
            built = build_engine(s, self.metrics)
            self._comm = built.comm
            built.engine.start()
            warm_up(built.engine)
            self.chat_template = built.chat_template
            self.loaded, self.engine, self.max_model_len = built.loaded, built.engine, built.max_len
        self.status = "ready"
        log.info("ready: serving %s as %r", self.loaded.path, s.model_name)


@dataclass
class BuiltEngine:
    loaded: LoadedModel
    engine: Engine
    max_len: int
    chat_template: ChatTemplate
    comm: GroupComm | None


def build_engine(s: ServerSettings, metrics: ServeMetrics | MetricsRecorder) -> BuiltEngine:
    """Load the weights and build the engine (not started); on a group's leader, join the group
    first, so every step the engine runs is announced to the workers."""
    if s.threads:
        torch.set_num_threads(s.threads)
    loaded = load_model(s.model, device=s.device, dtype=s.dtype)
    cfg = loaded.config
    max_len = s.max_model_len or cfg.max_seq_len
    if max_len > cfg.max_seq_len:
        raise ValueError(
            f"--max-model-len {max_len} exceeds the model's context of {cfg.max_seq_len} tokens"
        )
    chat_template = ChatTemplate.resolve(s.chat_template, loaded.chat_template)
    size = 1 if s.group is None else s.group.size
    comm = None
    if s.group is not None:
        comm = GroupComm(s.group, loaded.device)  # waits for every worker to join
    assert isinstance(loaded.model, Transformer)
    serving = ServingModel(
        loaded.model, size=size, all_reduce=None if comm is None else comm.all_reduce
    )
    if comm is not None:
        attach_leader(serving, comm)
    loaded.model = serving  # the unfused weights are no longer needed
    engine = Engine(
        serving,
        loaded.tokenizer,
        EngineConfig(
            max_batch_size=s.max_batch_size,
            max_model_len=max_len,
            max_queue=s.max_queue,
            max_prefill_tokens=max(s.max_prefill_tokens, 1),
            block_size=s.block_size,
            num_blocks=None if s.kv_cache_tokens is None else -(-s.kv_cache_tokens // s.block_size),
            prefix_caching=s.enable_prefix_caching,
        ),
        metrics,
        n_layers=cfg.n_layers,
        n_kv_heads=cfg.n_kv_heads // size,
        head_dim=cfg.head_dim,
        eos_token_ids=loaded.eos_token_ids,
        dtype=loaded.dtype,
        device=loaded.device,
    )
    if comm is not None:
        send_cache_layout(comm, engine.config.total_blocks, engine.config.block_size)
    return BuiltEngine(loaded, engine, max_len, chat_template, comm)


def warm_up(engine: Engine) -> None:
    """One short greedy generation through the real loop (first-call allocations, kernels)."""
    done = threading.Event()

    def sink(out: RequestOutput) -> None:
        if out.finished:
            done.set()

    engine.submit(
        "warmup", [0, 1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), sink
    )
    if not done.wait(timeout=300):
        raise TimeoutError("warm-up generation did not finish within 300 s")
    if engine.error is not None:
        raise RuntimeError(f"engine failed during warm-up: {engine.error}")
