"""Live training metrics: Prometheus ``/metrics`` and the ``/progress`` JSON the operator polls.

Every rank serves its own (on ``--metrics-port`` + local rank); the operator polls rank 0.
``/progress`` returns the contract's fields (docs/progress-contract.md)::

    {"step": int, "totalSteps": int, "loss": float|null, "tokensPerSecond": float|null,
     "mfu": float|null, "lastCheckpointStep": int|null, "etaSeconds": float|null,
     "exportSteps": [int], "exportPath": str|null}

plus ``rank``, ``gradNorm``, ``stepSeconds`` (this rank's wall time per step),
``ownStepSeconds`` (the part of it before this rank waits for its peers: see pace.py),
``checkpointStallSeconds``
(seconds this rank's loop was blocked saving checkpoints, a running total: the operator's
goodput timeline subtracts it from training time), ``valLoss``, ``valPerplexity`` and
``valStep``.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Dense bf16 tensor-core peak FLOP/s per GPU, from vendor datasheets (no sparsity).
# Matched against torch.cuda.get_device_name() in order, first hit wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H20", 148e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def peak_flops_for(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for needle, flops in PEAK_BF16_FLOPS:
        if needle in name:
            return flops
    return None


def resolve_peak_flops(explicit: float | None, device: torch.device, *, bf16: bool) -> float | None:
    """Peak FLOP/s of one device for MFU: ``--peak-flops`` whenever given, in any precision;
    otherwise the datasheet's dense bf16 peak, which only describes bf16 runs."""
    if explicit is not None:
        return explicit
    return peak_flops_for(device) if bf16 else None


def mfu(
    tokens_per_second: float, flops_per_token: float, peak_flops_total: float | None
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices."""
    if not peak_flops_total:
        return None
    return tokens_per_second * flops_per_token / peak_flops_total


@dataclass
class Progress:
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    last_checkpoint_step: int | None = None
    eta_seconds: float | None = None
    # Published serving snapshots (exports/step-N) and the final export, relative to the
    # checkpoint volume: the operator never infers an export from a checkpoint.
    export_steps: list[int] = field(default_factory=list)
    export_path: str | None = None
    # Beyond the contract's fields (which the operator reads); unknown fields are ignored.
    rank: int = 0
    grad_norm: float | None = None
    step_seconds: float | None = None  # this rank's mean wall time per step
    own_step_seconds: float | None = None  # of it, before waiting for peers (pace.py)
    checkpoint_stall_seconds: float = 0.0  # the loop blocked in checkpoint saves, in total
    val_loss: float | None = None
    val_perplexity: float | None = None
    val_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        def finite(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        return {
            "step": self.step,
            "totalSteps": self.total_steps,
            "loss": finite(self.loss),
            "tokensPerSecond": finite(self.tokens_per_second),
            "mfu": finite(self.mfu),
            "lastCheckpointStep": self.last_checkpoint_step,
            "etaSeconds": finite(self.eta_seconds),
            "exportSteps": list(self.export_steps),
            "exportPath": self.export_path,
            "rank": self.rank,
            "gradNorm": finite(self.grad_norm),
            "stepSeconds": finite(self.step_seconds),
            "ownStepSeconds": finite(self.own_step_seconds),
            "checkpointStallSeconds": round(self.checkpoint_stall_seconds, 3),
            "valLoss": finite(self.val_loss),
            "valPerplexity": finite(self.val_perplexity),
            "valStep": self.val_step,
        }


class TrainMetrics:
    """One rank's metrics and progress, optionally served over HTTP.

    Every series carries a ``rank`` label (the global rank), so the ranks of a job, each
    serving its own endpoint, can be told apart. Job-wide values (loss, throughput, MFU,
    gradient norm, learning rate, validation, planned steps) are exported by rank 0 only, so
    that summing a job's series never counts them once per rank; every rank exports its own
    step, step time and checkpoint save times. A series whose value is not known yet (MFU
    on a device without a known peak, the loss before the first interval) is absent rather
    than 0. ``/progress`` carries everything on every rank.
    """

    def __init__(self, total_steps: int, rank: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.rank = rank

        def gauge(name: str, help: str) -> Gauge:
            return Gauge(name, help, labelnames=("rank",), registry=self.registry)

        self.loss = gauge("phalanx_train_loss", "Training loss (mean over ranks)")
        self.grad_norm = gauge(
            "phalanx_train_grad_norm", "Global gradient norm before clipping (interval mean)"
        )
        self.tokens_per_second = gauge(
            "phalanx_train_tokens_per_second", "Training throughput, all ranks"
        )
        self.mfu = gauge(
            "phalanx_train_mfu", "Model FLOPs utilisation (0-1; absent when the peak is unknown)"
        )
        self.step_seconds = gauge(
            "phalanx_train_step_seconds", "This rank's mean wall time per step (last interval)"
        )
        self.own_step_seconds = gauge(
            "phalanx_train_own_step_seconds",
            "This rank's own work per step, before it waits for its peers (last interval)",
        )
        self.step = gauge("phalanx_train_step", "Optimizer steps completed")
        self.total_steps = gauge("phalanx_train_total_steps", "Optimizer steps planned")
        self.learning_rate = gauge("phalanx_train_learning_rate", "Current learning rate")
        self.val_loss = gauge("phalanx_train_val_loss", "Validation loss on the fixed val set")
        self.val_perplexity = gauge(
            "phalanx_train_val_perplexity", "exp(validation loss) on the fixed val set"
        )
        self.checkpoint_seconds = Histogram(
            "phalanx_checkpoint_save_seconds",
            "Time to write and publish one checkpoint",
            labelnames=("rank",),
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self._rank = str(rank)
        self._job_wide = rank == 0
        self.progress = Progress(total_steps=total_steps, rank=rank)
        if self._job_wide:
            self.total_steps.labels(self._rank).set(total_steps)
        self.step.labels(self._rank).set(0)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def record_step(
        self,
        *,
        step: int,
        loss: float,
        lr: float,
        tokens_per_second: float | None,
        mfu: float | None,
        eta_seconds: float | None,
        grad_norm: float | None = None,
        step_seconds: float | None = None,
        own_step_seconds: float | None = None,
    ) -> None:
        with self._lock:
            self.progress.step = step
            self.progress.loss = loss
            self.progress.tokens_per_second = tokens_per_second
            self.progress.mfu = mfu
            self.progress.eta_seconds = eta_seconds
            self.progress.grad_norm = grad_norm
            self.progress.step_seconds = step_seconds
            self.progress.own_step_seconds = own_step_seconds
        rank = self._rank
        self.step.labels(rank).set(step)
        for series, value in (
            (self.step_seconds, step_seconds),
            (self.own_step_seconds, own_step_seconds),
        ):
            if value is not None:
                series.labels(rank).set(value)
        if not self._job_wide:
            return
        self.loss.labels(rank).set(loss)
        self.learning_rate.labels(rank).set(lr)
        for series, value in (
            (self.tokens_per_second, tokens_per_second),
            (self.mfu, mfu),
            (self.grad_norm, grad_norm),
        ):
            if value is not None:
                series.labels(rank).set(value)

    def record_eval(self, *, step: int, loss: float, perplexity: float) -> None:
        with self._lock:
            self.progress.val_loss = loss
            self.progress.val_perplexity = perplexity
            self.progress.val_step = step
        if self._job_wide:
            self.val_loss.labels(self._rank).set(loss)
            self.val_perplexity.labels(self._rank).set(perplexity)

    def record_checkpoint(self, step: int, seconds: float) -> None:
        with self._lock:
            self.progress.last_checkpoint_step = step
        self.checkpoint_seconds.labels(self._rank).observe(seconds)

    def record_stall(self, seconds: float) -> None:
        """Time the training loop waited for a checkpoint save (all of a synchronous save, the
        staging of an asynchronous one)."""
        with self._lock:
            self.progress.checkpoint_stall_seconds += max(0.0, seconds)

    def record_exports(self, steps: list[int], path: str | None) -> None:
        with self._lock:
            self.progress.export_steps = sorted(steps)
            self.progress.export_path = path

    def set_position(self, step: int, last_checkpoint_step: int | None) -> None:
        with self._lock:
            self.progress.step = step
            self.progress.last_checkpoint_step = last_checkpoint_step
        self.step.labels(self._rank).set(step)

    def progress_json(self) -> dict[str, Any]:
        with self._lock:
            return self.progress.to_json()

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the HTTP server in a daemon thread; returns the bound port (0 = any free)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
                elif path == "/progress":
                    body = json.dumps(metrics.progress_json()).encode()
                    self._send(200, "application/json", body)
                elif path in ("/healthz", "/"):
                    self._send(200, "text/plain", b"ok\n")
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would drown the training log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
