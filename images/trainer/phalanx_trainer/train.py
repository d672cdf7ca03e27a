"""The training loop: resume, step, log, checkpoint, stop on SIGTERM, export."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from phalanx_trainer import steplog
from phalanx_trainer.checkpoint import (
    EXPORT_DIR,
    STEP_EXPORTS_DIR,
    CheckpointManager,
    export_for_serving,
    export_step,
    list_step_exports,
    volume_relative,
)
from phalanx_trainer.config import PLATFORM_ENV, TrainConfig
from phalanx_trainer.data import DistributedTokenLoader, PreparedData, ensure_builtin_data
from phalanx_trainer.distributed import DistEnv, init_distributed, new_gloo_group, shutdown
from phalanx_trainer.evaluation import ValidationSet, resolve_eval_every
from phalanx_trainer.loss import auto_chunk_tokens
from phalanx_trainer.metrics import TrainMetrics, mfu, resolve_peak_flops
from phalanx_trainer.model import ModelConfig, Transformer
from phalanx_trainer.optim import build_optimizer, build_scheduler
from phalanx_trainer.pace import OwnPace, time_gradient_buckets
from phalanx_trainer.parallel import (
    check_tensor_parallel,
    clip_grad_norm,
    data_parallel_position,
    no_grad_sync,
    parallelize,
    unwrap,
)
from phalanx_trainer.termination import (
    InvalidConfig,
    Termination,
    completed,
    conclude,
    report,
    stopped,
)

log = logging.getLogger("phalanx_trainer")

DEFAULT_LR = {"nano": 3e-3, "gpt2-small": 6e-4, "1b": 3e-4}
TRAIN_LOG_FILE = steplog.TRAIN_LOG_FILE
VOLUME_ENV = PLATFORM_ENV["checkpoint_dir"]
# Above this many parameters FSDP builds the model on the meta device and initialises
# it shard by shard instead of materialising a full copy on every rank.
META_INIT_PARAMS = 500_000_000


@dataclass
class StopRequest:
    """Records SIGTERM/SIGINT; the loop stops at the next step boundary on every rank."""

    signum: int | None = None
    _previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        # A second signal acts at once (default action) instead of waiting for the step.
        self.uninstall()

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    try:
        if cfg.model_config:
            return ModelConfig.from_dict(json.loads(Path(cfg.model_config).read_text()))
        return ModelConfig.preset(cfg.preset)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidConfig(f"model configuration {cfg.model_config or cfg.preset}: {exc}") from exc


def resolve_data(cfg: TrainConfig, env: DistEnv, model_cfg: ModelConfig) -> PreparedData:
    if cfg.data:
        data = PreparedData.open(cfg.data)
    else:
        # One process per node prepares the cache; the rest wait, then open it.
        vocab = min(model_cfg.vocab_size, 8192)
        if env.local_rank == 0:
            ensure_builtin_data(vocab, cfg.data_cache)
        dist.barrier()
        data = ensure_builtin_data(vocab, cfg.data_cache)
    if data.vocab_size > model_cfg.vocab_size:
        raise InvalidConfig(
            f"the data's tokenizer has {data.vocab_size} tokens but the model only "
            f"{model_cfg.vocab_size}; use a larger model vocab or re-prepare the data"
        )
    return data


def build_model(
    model_cfg: ModelConfig, cfg: TrainConfig, env: DistEnv, *, bf16: bool = False
) -> nn.Module:
    meta_init = cfg.parallelism == "fsdp" and model_cfg.num_params() > META_INIT_PARAMS
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if meta_init:
        with torch.device("meta"):
            model = Transformer(model_cfg)
    else:
        model = Transformer(model_cfg).to(env.device)
    wrapped = parallelize(
        model,
        parallelism="fsdp" if cfg.parallelism == "fsdp" else "ddp",
        device=env.device,
        compile_blocks=cfg.compile,
        activation_checkpointing=cfg.activation_checkpointing,
        bf16_params=bf16,
        tensor_parallel=cfg.tensor_parallel,
    )
    if meta_init:
        model.to_empty(device=env.device)
        model.init_weights()
    return wrapped


def setup_logging(rank: int) -> None:
    """One plain line per event on stderr; only rank 0 logs below WARNING."""
    pkg = logging.getLogger("phalanx_trainer")
    pkg.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in pkg.handlers:
        if getattr(handler, "phalanx", False):
            pkg.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.phalanx = True  # type: ignore[attr-defined]
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s rank{rank} %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
        )
    )
    pkg.addHandler(handler)


def run(cfg: TrainConfig, environ: Mapping[str, str] | None = None) -> Termination:
    """Train to ``cfg.steps``; returns how it ended, already reported (see ``termination``).

    Stopped by SIGTERM: exit 143, reason ``Stopped``. A failure is classified and reported
    while the stop handler still holds SIGTERM and before the process group is torn down,
    so neither torchrun's signal to the survivors nor a hanging teardown loses it.
    """
    env_vars = os.environ if environ is None else environ
    stop = StopRequest()
    stop.install()
    try:
        env = init_distributed(cfg.device, cfg.pg_timeout, env_vars)
        setup_logging(env.rank)
        termination = Trainer(cfg, env, stop, env_vars).train()
        report(termination, env_vars)
        return termination
    except BaseException as exc:
        failure = conclude(exc, env_vars)
        if failure is None:
            raise
        return failure
    finally:
        stop.uninstall()
        shutdown()


@dataclass
class PendingStep:
    """A finished step whose loss is still on the device (no host sync on ordinary steps)."""

    step: int
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        stop: StopRequest,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg, self.env, self.stop = cfg, env, stop
        env_vars = os.environ if environ is None else environ
        # Control-flow agreement (stop or not) on the CPU so it never syncs the GPU stream.
        self.control_group = new_gloo_group()
        self.model_cfg = resolve_model_config(cfg)
        self.data = resolve_data(cfg, env, self.model_cfg)
        self.seq_len = cfg.seq_len or self.model_cfg.max_seq_len
        if self.seq_len > self.model_cfg.max_seq_len:
            raise InvalidConfig(
                f"--seq-len {self.seq_len} exceeds the model's max_seq_len "
                f"{self.model_cfg.max_seq_len}"
            )
        self.bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and env.device.type != "cpu"
        )
        # FSDP casts parameters itself (MixedPrecisionPolicy); DDP and one process autocast.
        fsdp_mixed = self.bf16 and cfg.parallelism == "fsdp"
        self.autocast_dtype = torch.bfloat16 if self.bf16 and not fsdp_mixed else None
        check_tensor_parallel(
            self.model_cfg, cfg.tensor_parallel, env.world_size, cfg.parallelism,
            env.local_world_size,
        )  # fmt: skip
        self.model = build_model(self.model_cfg, cfg, env, bf16=self.bf16)
        # This rank's own work per step, without the wait for its peers (stragglers).
        self.pace = OwnPace(env.device)
        time_gradient_buckets(self.model, self.pace)
        unwrap(self.model).loss_chunk = (
            auto_chunk_tokens(self.model_cfg.vocab_size)
            if cfg.loss_chunk is None
            else cfg.loss_chunk
        )
        lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.preset, 3e-4)
        self.optimizer = build_optimizer(
            self.model,
            lr=lr,
            weight_decay=cfg.weight_decay,
            betas=(0.9, 0.95),
            fused=env.device.type == "cuda",
        )
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, cfg.steps // 10)
        self.scheduler = build_scheduler(
            self.optimizer, warmup=warmup, total=cfg.steps, min_ratio=cfg.min_lr_ratio
        )
        # Ranks of one tensor-parallel group read the same batch.
        self.dp_rank, self.dp_size = data_parallel_position(
            env.rank, env.world_size, cfg.tensor_parallel
        )
        self.loader = DistributedTokenLoader(
            self.data,
            seq_len=self.seq_len,
            micro_batch=cfg.batch_size,
            rank=self.dp_rank,
            world_size=self.dp_size,
            seed=cfg.seed,
        )
        self.eval_every = resolve_eval_every(cfg.eval_every, self.data)
        self.val_set: ValidationSet | None = None
        if self.eval_every > 0:
            self.val_set = ValidationSet(
                self.data, seq_len=self.seq_len, samples=cfg.eval_samples, batch=cfg.batch_size
            )
        self.tokens_per_step = self.dp_size * cfg.batch_size * cfg.grad_accum * self.seq_len
        self.flops_per_token = self.model_cfg.flops_per_token(self.seq_len)
        peak = resolve_peak_flops(cfg.peak_flops, env.device, bf16=self.bf16)
        self.peak_flops_total = peak * env.world_size if peak else None
        self.metrics = TrainMetrics(cfg.steps, rank=env.rank)
        self.root = Path(cfg.checkpoint_dir)
        self.log_path = self.root / TRAIN_LOG_FILE
        # The volume the operator mounts; exports are reported relative to it.
        self.volume = env_vars.get(VOLUME_ENV) or None
        self.ckpt = CheckpointManager(
            self.root,
            keep=cfg.keep,
            async_save=cfg.async_save,
            on_saved=self.metrics.record_checkpoint,
        )
        self.step = 0
        self.last_saved_step: int | None = None
        self.metrics_port: int | None = None
        # Steps not yet in the log, extra fields for them (throughput, validation), and the
        # logged records of the current interval (restored from the log after a resume).
        self._pending: list[PendingStep] = []
        self._annotations: dict[int, steplog.Record] = {}
        self._interval: list[steplog.Record] = []

    # -- setup ----------------------------------------------------------------------------

    def _announce(self) -> None:
        cfg, env = self.cfg, self.env
        if env.is_main:
            log.info("config %s", json.dumps(cfg.to_dict(), sort_keys=True))
            log.info(
                "model %s: %.2fM params, %s; data %s (%d train tokens, vocab %d)",
                cfg.model_config or cfg.preset,
                self.model_cfg.num_params() / 1e6,
                json.dumps(self.model_cfg.to_dict()),
                self.data.path,
                self.data.num_tokens("train"),
                self.data.vocab_size,
            )
            log.info(
                "world %d (%s on %s), %d tokens/step, precision %s, restart %s",
                env.world_size,
                cfg.parallelism
                + (
                    f", mesh dp={self.dp_size} x tp={cfg.tensor_parallel}"
                    if cfg.tensor_parallel > 1
                    else ""
                ),
                env.device,
                self.tokens_per_step,
                ("bf16 (FSDP mixed precision)" if self.autocast_dtype is None else "bf16")
                if self.bf16
                else "fp32",
                os.environ.get("PHALANX_RESTART", "0"),
            )
            if self.volume and volume_relative(self.root, self.volume) is None:
                log.warning(
                    "--checkpoint-dir %s is outside the checkpoint volume %s ($%s): exports "
                    "written there are not reported to the operator",
                    self.root,
                    self.volume,
                    VOLUME_ENV,
                )
            if self.val_set is not None:
                log.info(
                    "validation every %d steps on %d fixed val sequences of %d tokens",
                    self.eval_every,
                    self.val_set.samples,
                    self.seq_len,
                )
            else:
                log.info(
                    "no validation: %s",
                    "--eval-every 0"
                    if cfg.eval_every == 0
                    else f"{self.data.path} has no val split",
                )

    def _resume(self) -> None:
        state = self.ckpt.load_latest(self.model, self.optimizer)
        if state is None:
            log.info("no checkpoint in %s; starting from scratch", self.root)
        else:
            self.step = int(state["step"])
            if state.get("totalSteps") != self.cfg.steps:
                log.warning(
                    "checkpoint was written for %s total steps, this run has %d: the "
                    "learning-rate schedule changes from here",
                    state.get("totalSteps"),
                    self.cfg.steps,
                )
            self.scheduler.load_state_dict(state["scheduler"])
            self.loader.load_state_dict(state["data"])
            self.last_saved_step = self.step
        self._restore_log()

    def _restore_log(self) -> None:
        """Cut the log back to the resumed step, so redone steps replace, never duplicate."""
        if self.env.is_main:
            kept = steplog.kept_records(steplog.read_records(self.log_path), self.step)
            steplog.rewrite(self.log_path, kept)
        dist.barrier()
        kept = steplog.read_records(self.log_path)
        after = steplog.interval_start(self.step + 1, self.cfg.log_every)
        self._interval = [r for r in kept if r["step"] > after]
        evaluated = [r for r in kept if r.get("valLoss") is not None]
        if evaluated:
            last = evaluated[-1]
            self.metrics.record_eval(
                step=last["step"], loss=last["valLoss"], perplexity=last["valPerplexity"]
            )

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "totalSteps": self.cfg.steps,
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "modelConfig": self.model_cfg.to_dict(),
            "trainConfig": self.cfg.to_dict(),
        }

    def _serve_metrics(self) -> None:
        """Every rank serves its own endpoint, on the port plus its local rank."""
        base = self.cfg.metrics_port
        if base < 0:
            return
        port = base + self.env.local_rank if base > 0 else 0
        try:
            self.metrics_port = self.metrics.serve(port)
        except OSError as exc:
            raise InvalidConfig(
                f"rank {self.env.rank} cannot serve metrics on port {port} "
                f"(--metrics-port {base} + local rank {self.env.local_rank}): {exc}"
            ) from exc
        log.info("serving /metrics and /progress on port %d", self.metrics_port)

    # -- the loop -------------------------------------------------------------------------

    def train(self) -> Termination:
        self._announce()
        self._resume()
        self._report_exports(final=self._exported_already())
        self._serve_metrics()
        self.metrics.set_position(self.step, self.last_saved_step)
        self.model.train()

        cfg = self.cfg
        interval_start, timed_steps = time.monotonic(), 0
        try:
            while self.step < cfg.steps:
                if self._stop_requested():
                    return self._stop()
                lr = float(self.scheduler.get_last_lr()[0])
                loss, grad_norm = self._train_step()
                self.step += 1
                timed_steps += 1
                self._pending.append(PendingStep(self.step, lr, loss, grad_norm))
                last = self.step == cfg.steps
                step_done = time.monotonic()
                if self.eval_every > 0 and (self.step % self.eval_every == 0 or last):
                    self._evaluate()
                interval_over = self.step % cfg.log_every == 0 or last
                if interval_over:
                    self._log_interval(timed_steps, step_done - interval_start)
                    timed_steps = 0
                every = cfg.checkpoint_every
                if (every > 0 and self.step % every == 0) or last:
                    self._flush_log()  # every step up to a checkpoint is in the log
                    self._save(final=last)
                if cfg.export_every > 0 and self.step % cfg.export_every == 0:
                    self._export(f"{STEP_EXPORTS_DIR}/step-{self.step}")
                    self._report_exports(final=False)
                # Evaluation, logging, saves and exports stay out of tokens/s and step times.
                now = time.monotonic()
                interval_start = now if interval_over else interval_start + (now - step_done)
            self._flush_log()
            if self.last_saved_step != self.step:
                self._save(final=True)
            self.ckpt.wait()
            if cfg.export and not self._exported_already():
                self._export()
            final = cfg.export and self._exported_already()
            self._report_exports(final=final)
            log.info("training complete at step %d", self.step)
            return completed(
                f"training complete at step {self.step}"
                + (f"; exported to {EXPORT_DIR}" if final else ""),
                export_path=self._export_path() if final else None,
                export_steps=list_step_exports(self.root),
                progress=self.metrics.progress_json(),
            )
        finally:
            self.metrics.close()

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns its loss and the global gradient norm before clipping."""
        cfg = self.cfg
        self.pace.start_step()
        step_loss = torch.zeros((), device=self.env.device)
        for micro in range(cfg.grad_accum):
            inputs, targets = self.loader.next_batch()
            inputs = inputs.to(self.env.device, non_blocking=True)
            targets = targets.to(self.env.device, non_blocking=True)
            last_micro = micro == cfg.grad_accum - 1
            with no_grad_sync(self.model, skip=not last_micro):
                with self._autocast():
                    # fp32 loss, chunked over the output projection (see loss.py).
                    loss = self.model(inputs, targets=targets)
                torch.autograd.backward(loss / cfg.grad_accum)
            step_loss += loss.detach() / cfg.grad_accum
        # With clipping off the norm is still measured: an infinite bound scales by 1.0.
        bound = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        if cfg.tensor_parallel > 1:  # gradients on two meshes: see clip_grad_norm
            grad_norm = clip_grad_norm(self.model.parameters(), bound)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), bound)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm of sharded gradients
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.pace.end_step()
        return step_loss, grad_norm.detach().float()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _flush_log(self) -> list[steplog.Record]:
        """Bring the pending steps to the host (one all-reduce) and append them to the log."""
        if not self._pending:
            return []
        losses = torch.stack([p.loss for p in self._pending])
        dist.all_reduce(losses, op=dist.ReduceOp.SUM)
        mean_losses = (losses / self.env.world_size).tolist()
        norms = torch.stack([p.grad_norm for p in self._pending]).tolist()
        records = []
        for pending, loss, norm in zip(self._pending, mean_losses, norms, strict=True):
            record: steplog.Record = {
                "step": pending.step,
                "loss": loss,
                "gradNorm": norm,
                "lr": pending.lr,
            }
            record.update(self._annotations.pop(pending.step, {}))
            records.append(record)
        self._pending.clear()
        if self.env.is_main:
            steplog.append(self.log_path, records)
        self._interval.extend(records)
        return records

    def _log_interval(self, timed_steps: int, seconds: float) -> None:
        step, cfg = self.step, self.cfg
        tokens_per_second = (
            self.tokens_per_step * timed_steps / seconds if seconds > 0 and timed_steps else None
        )
        achieved_mfu = (
            mfu(tokens_per_second, self.flops_per_token, self.peak_flops_total)
            if tokens_per_second
            else None
        )
        throughput: steplog.Record = {"tokensPerSecond": tokens_per_second}
        if achieved_mfu is not None:
            throughput["mfu"] = achieved_mfu
        self._annotations.setdefault(step, {}).update(throughput)
        self._flush_log()
        # Intervals end on multiples of --log-every whatever step a run resumed from, and
        # their means cover logged steps (restored from the log after a resume).
        after = steplog.interval_start(step, cfg.log_every)
        loss = steplog.interval_mean(self._interval, after, step, "loss")
        grad_norm = steplog.interval_mean(self._interval, after, step, "gradNorm")
        lr = float(self._interval[-1]["lr"])  # the rate the interval's last step used
        self._interval = []
        assert loss is not None
        step_seconds = seconds / timed_steps if timed_steps else None
        eta = step_seconds * (cfg.steps - step) if step_seconds is not None else None
        self.metrics.record_step(
            step=step,
            loss=loss,
            lr=lr,
            tokens_per_second=tokens_per_second,
            mfu=achieved_mfu,
            eta_seconds=eta,
            grad_norm=grad_norm,
            step_seconds=step_seconds,
            own_step_seconds=self.pace.interval_seconds(),
        )
        mfu_text = f"{achieved_mfu:.1%}" if achieved_mfu is not None else "n/a"
        log.info(
            "step %d/%d | loss %.4f | gnorm %.3f | lr %.3e | tok/s %.0f | mfu %s | "
            "%.3fs/step | eta %.0fs",
            step,
            cfg.steps,
            loss,
            grad_norm or 0.0,
            lr,
            tokens_per_second or 0.0,
            mfu_text,
            step_seconds or 0.0,
            eta or 0.0,
        )

    def _evaluate(self) -> None:
        """Validation loss on the fixed val set (collective: every rank runs it)."""
        assert self.val_set is not None
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                loss_sum, tokens = self.val_set.loss_sum(
                    self.model, self.dp_rank, self.dp_size, self.env.device
                )
        finally:
            self.model.train()
        totals = torch.stack([loss_sum, tokens])
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        val_loss = float(totals[0] / totals[1])
        perplexity = math.exp(min(val_loss, 700.0))  # exp overflows a float past ~709
        self._annotations.setdefault(self.step, {}).update(
            {"valLoss": val_loss, "valPerplexity": perplexity}
        )
        self.metrics.record_eval(step=self.step, loss=val_loss, perplexity=perplexity)
        log.info(
            "step %d/%d | val loss %.4f | val ppl %.2f",
            self.step,
            self.cfg.steps,
            val_loss,
            perplexity,
        )

    def _save(self, *, final: bool) -> None:
        started = time.monotonic()
        self.ckpt.save(self.step, self.model, self.optimizer, self._trainer_state(), final=final)
        self.metrics.record_stall(time.monotonic() - started)
        self.last_saved_step = self.step

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1 if self.stop.signum is not None else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(flag.item())

    def _stop(self) -> Termination:
        signum = self.stop.signum or signal.SIGTERM
        log.warning("stop requested (signal %d) at step %d", signum, self.step)
        self.ckpt.wait()  # finish the in-flight save rather than leave it half written
        self._flush_log()
        if self.cfg.checkpoint_on_signal and self.last_saved_step != self.step and self.step > 0:
            self._save(final=False)
            self.ckpt.wait()
        return stopped(
            int(signum),
            f"stopped by signal {int(signum)} at step {self.step}; "
            f"newest checkpoint step-{self.last_saved_step}",
        )

    def _exported_already(self) -> bool:
        """A restart after the export finished has nothing left to do."""
        return export_step(self.root) == self.step and self.step >= self.cfg.steps

    def _report_exports(self, *, final: bool) -> None:
        # Only this run's own final export counts: one left from a shorter earlier run in
        # the same directory is not the model this job promises.
        self.metrics.record_exports(
            list_step_exports(self.root), self._export_path() if final else None
        )

    def _export_path(self) -> str | None:
        return volume_relative(self.root / EXPORT_DIR, self.volume)

    def _export(self, name: str = EXPORT_DIR) -> None:
        if self.cfg.export_dtype == "auto":
            dtype = torch.bfloat16 if self.bf16 else torch.float32
        else:
            dtype = getattr(torch, self.cfg.export_dtype)
        export_for_serving(
            self.model,
            self.model_cfg,
            self.data.tokenizer_path,
            self.root,
            step=self.step,
            dtype=dtype,
            name=name,
        )
