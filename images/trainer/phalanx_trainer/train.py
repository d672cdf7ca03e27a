"""The training loop: resume, step, log, checkpoint, stop on SIGTERM, export."""

from __future__ import annotations

import contextlib
import json
import logging
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
import torch.nn.functional as F
from torch import nn

from phalanx_trainer.checkpoint import (
    EXPORT_DIR,
    STEP_EXPORTS_DIR,
    CheckpointManager,
    export_for_serving,
    export_step,
    list_step_exports,
)
from phalanx_trainer.config import TrainConfig
from phalanx_trainer.data import DistributedTokenLoader, PreparedData, ensure_builtin_data
from phalanx_trainer.distributed import DistEnv, init_distributed, new_gloo_group, shutdown
from phalanx_trainer.metrics import TrainMetrics, mfu, peak_flops_for
from phalanx_trainer.model import ModelConfig, Transformer
from phalanx_trainer.optim import build_optimizer, build_scheduler
from phalanx_trainer.parallel import no_grad_sync, parallelize
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
TRAIN_LOG_FILE = "train_log.jsonl"
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


def build_model(model_cfg: ModelConfig, cfg: TrainConfig, env: DistEnv) -> nn.Module:
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
        env = init_distributed(cfg.device, cfg.pg_timeout)
        setup_logging(env.rank)
        termination = Trainer(cfg, env, stop).train()
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


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv, stop: StopRequest) -> None:
        self.cfg, self.env, self.stop = cfg, env, stop
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
        use_bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and env.device.type == "cuda"
        )
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.model = build_model(self.model_cfg, cfg, env)
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
        self.loader = DistributedTokenLoader(
            self.data,
            seq_len=self.seq_len,
            micro_batch=cfg.batch_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.seed,
        )
        self.tokens_per_step = env.world_size * cfg.batch_size * cfg.grad_accum * self.seq_len
        self.flops_per_token = self.model_cfg.flops_per_token(self.seq_len)
        peak = cfg.peak_flops or peak_flops_for(env.device)
        self.peak_flops_total = peak * env.world_size if peak and use_bf16 else None
        self.metrics = TrainMetrics(cfg.steps)
        self.root = Path(cfg.checkpoint_dir)
        self.ckpt = CheckpointManager(
            self.root,
            keep=cfg.keep,
            async_save=cfg.async_save,
            on_saved=self.metrics.record_checkpoint,
        )
        self.step = 0
        self.last_saved_step: int | None = None
        self.metrics_port: int | None = None
        self._lr = lr

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
                cfg.parallelism,
                env.device,
                self.tokens_per_step,
                "bf16" if self.autocast_dtype else "fp32",
                os.environ.get("PHALANX_RESTART", "0"),
            )

    def _resume(self) -> None:
        state = self.ckpt.load_latest(self.model, self.optimizer)
        if state is None:
            log.info("no checkpoint in %s; starting from scratch", self.root)
            return
        self.step = int(state["step"])
        if state.get("totalSteps") != self.cfg.steps:
            log.warning(
                "checkpoint was written for %s total steps, this run has %d: the learning-rate "
                "schedule changes from here",
                state.get("totalSteps"),
                self.cfg.steps,
            )
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        self.last_saved_step = self.step

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "totalSteps": self.cfg.steps,
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "modelConfig": self.model_cfg.to_dict(),
            "trainConfig": self.cfg.to_dict(),
        }

    # -- the loop -------------------------------------------------------------------------

    def train(self) -> Termination:
        self._announce()
        self._resume()
        self._report_exports(final=self._exported_already())
        if self.env.is_main and self.cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.cfg.metrics_port)
            log.info("serving /metrics and /progress on port %d", self.metrics_port)
        self.metrics.set_position(self.step, self.last_saved_step)
        self.model.train()

        # Loss stays on the device between log intervals: no host sync on ordinary steps.
        loss_sum = torch.zeros((), device=self.env.device)
        interval_start, interval_steps = time.monotonic(), 0
        try:
            while self.step < self.cfg.steps:
                if self._stop_requested():
                    return self._stop()
                loss_sum += self._train_step()
                self.step += 1
                interval_steps += 1
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    self._log_interval(loss_sum, interval_steps, time.monotonic() - interval_start)
                    loss_sum.zero_()
                    interval_steps = 0
                    interval_start = time.monotonic()
                every = self.cfg.checkpoint_every
                if (every > 0 and self.step % every == 0) or self.step == self.cfg.steps:
                    save_start = time.monotonic()
                    self._save(final=self.step == self.cfg.steps)
                    interval_start += time.monotonic() - save_start  # keep saves out of tok/s
                if self.cfg.export_every > 0 and self.step % self.cfg.export_every == 0:
                    export_start = time.monotonic()
                    self._export(f"{STEP_EXPORTS_DIR}/step-{self.step}")
                    self._report_exports(final=False)
                    interval_start += time.monotonic() - export_start
            if self.last_saved_step != self.step:
                self._save(final=True)
            self.ckpt.wait()
            if self.cfg.export and not self._exported_already():
                self._export()
            final = self.cfg.export and self._exported_already()
            self._report_exports(final=final)
            log.info("training complete at step %d", self.step)
            return completed(
                f"training complete at step {self.step}"
                + (f"; exported to {EXPORT_DIR}" if final else ""),
                export_path=EXPORT_DIR if final else None,
                export_steps=list_step_exports(self.root),
            )
        finally:
            self.metrics.close()

    def _train_step(self) -> torch.Tensor:
        cfg = self.cfg
        lr = float(self.scheduler.get_last_lr()[0])
        step_loss = torch.zeros((), device=self.env.device)
        for micro in range(cfg.grad_accum):
            inputs, targets = self.loader.next_batch()
            inputs = inputs.to(self.env.device, non_blocking=True)
            targets = targets.to(self.env.device, non_blocking=True)
            last_micro = micro == cfg.grad_accum - 1
            with no_grad_sync(self.model, skip=not last_micro):
                with self._autocast():
                    logits = self.model(inputs)
                # Loss in fp32 and backward outside autocast (its ops pick their own dtypes).
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                torch.autograd.backward(loss / cfg.grad_accum)
            step_loss += loss.detach() / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._lr = lr
        return step_loss

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _log_interval(self, loss_sum: torch.Tensor, steps: int, seconds: float) -> None:
        mean = loss_sum.detach().clone() / max(1, steps)
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        loss = mean.item() / self.env.world_size
        tokens_per_second = self.tokens_per_step * steps / seconds if seconds > 0 else None
        achieved_mfu = (
            mfu(tokens_per_second, self.flops_per_token, self.peak_flops_total)
            if tokens_per_second
            else None
        )
        eta = seconds / steps * (self.cfg.steps - self.step) if steps else None
        self.metrics.record_step(
            step=self.step,
            loss=loss,
            lr=self._lr,
            tokens_per_second=tokens_per_second,
            mfu=achieved_mfu,
            eta_seconds=eta,
        )
        if not self.env.is_main:
            return
        mfu_text = f"{achieved_mfu:.1%}" if achieved_mfu is not None else "n/a"
        log.info(
            "step %d/%d | loss %.4f | lr %.3e | tok/s %.0f | mfu %s | %.3fs/step | eta %.0fs",
            self.step,
            self.cfg.steps,
            loss,
            self._lr,
            tokens_per_second or 0.0,
            mfu_text,
            seconds / max(1, steps),
            eta or 0.0,
        )
        record = {
            "step": self.step,
            "loss": loss,
            "lr": self._lr,
            "tokensPerSecond": tokens_per_second,
        }
        with open(self.root / TRAIN_LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, *, final: bool) -> None:
        self.ckpt.save(self.step, self.model, self.optimizer, self._trainer_state(), final=final)
        self.last_saved_step = self.step

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1 if self.stop.signum is not None else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(flag.item())

    def _stop(self) -> Termination:
        signum = self.stop.signum or signal.SIGTERM
        log.warning("stop requested (signal %d) at step %d", signum, self.step)
        self.ckpt.wait()  # finish the in-flight save rather than leave it half written
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
        self.metrics.record_exports(list_step_exports(self.root), EXPORT_DIR if final else None)

    def _export(self, name: str = EXPORT_DIR) -> None:
        if self.cfg.export_dtype == "auto":
            dtype = torch.bfloat16 if self.autocast_dtype is not None else torch.float32
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
