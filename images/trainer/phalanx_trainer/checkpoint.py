"""Training checkpoints and the serving export, both published atomically.

Layout under the checkpoint root (``$PHALANX_CHECKPOINT_DIR``; shared by all ranks, so on
more than one node it must be a shared filesystem)::

    step-200/            torch.distributed.checkpoint files (model + optimizer, sharded)
      trainer_state.json step, scheduler, data position, model config
      rng/rank-<r>.pt    each rank's RNG states
      COMPLETE           written last; a directory without it is ignored
    step-200.tmp/        a save in progress (or abandoned by a crash; removed at start)
    export/              Hugging Face Llama checkpoint + phalanx.json + COMPLETE

Publishing: every rank writes into ``step-N.tmp``, all ranks meet at a barrier, rank 0
renames it to ``step-N`` and writes ``COMPLETE`` last. A crash at any point leaves either
the previous complete checkpoints untouched or a directory without ``COMPLETE``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from phalanx_trainer import hf
from phalanx_trainer.distributed import all_ranks_agree, new_gloo_group
from phalanx_trainer.model import ModelConfig
from phalanx_trainer.termination import CheckpointError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.json"
EXPORT_DIR = "export"
STEP_EXPORTS_DIR = "exports"  # exports/step-N: serving snapshots taken during training
EXPORT_INFO_FILE = "phalanx.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# "STEP:SECONDS": sleep that long after writing step-STEP and before publishing it. Tests use
# it to stand in for slow storage so a save can be interrupted; never set in production.
SAVE_HOLD_ENV = "PHALANX_TRAIN_SAVE_HOLD"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    final: bool


def list_complete(root: Path) -> list[CheckpointInfo]:
    """Published checkpoints, oldest first."""
    found: list[CheckpointInfo] = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        marker = child / COMPLETE_MARKER
        if m and marker.is_file():
            try:
                final = bool(json.loads(marker.read_text()).get("final", False))
            except (json.JSONDecodeError, OSError):
                final = False
            found.append(CheckpointInfo(int(m.group(1)), child, final))
    return sorted(found, key=lambda c: c.step)


def list_step_exports(root: Path) -> list[int]:
    """Steps whose ``exports/step-N`` snapshot is published (``COMPLETE`` present), ascending."""
    base = root / STEP_EXPORTS_DIR
    if not base.is_dir():
        return []
    steps = []
    for child in base.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / COMPLETE_MARKER).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def export_step(root: Path, name: str = EXPORT_DIR) -> int | None:
    """The step of the published export ``<root>/<name>``, or None when it is not complete."""
    try:
        return int(json.loads((root / name / COMPLETE_MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def volume_relative(path: Path, volume: str | None) -> str | None:
    """``path`` relative to the checkpoint volume (``$PHALANX_CHECKPOINT_DIR``), as the
    operator reads it; without a volume, relative to nothing but itself (its last part).
    None when the path lies outside the volume: the operator could not find it there."""
    if not volume:
        return path.name
    try:
        return str(path.resolve().relative_to(Path(volume).resolve()))
    except ValueError:
        return None


def retained(checkpoints: list[CheckpointInfo], keep: int) -> set[int]:
    """Steps to keep: the newest ``keep`` plus every final one."""
    newest = {c.step for c in checkpoints[-keep:]} if keep > 0 else set()
    return newest | {c.step for c in checkpoints if c.final}


def _write_marker(path: Path, payload: dict[str, Any]) -> None:
    # fsync the marker and its directory so "COMPLETE exists" survives a node crash.
    with open(path, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_checkpoint(path: Path) -> None:
    # Drop the marker first so a half-deleted directory can never look complete.
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(
        self,
        root: str | Path,
        *,
        keep: int,
        async_save: bool = False,
        on_saved: Callable[[int, float], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.keep = keep
        self.rank = dist.get_rank()
        self.async_save = async_save
        self.on_saved = on_saved
        self._pending: tuple[Future[Any], int, bool, float] | None = None
        # Async saves run their collectives in a background thread; a separate gloo group
        # keeps them off the training communicator.
        self._async_group = new_gloo_group() if async_save else None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_unpublished()
        dist.barrier()

    def _remove_unpublished(self) -> None:
        for child in self.root.iterdir():
            is_tmp = child.name.endswith(".tmp") and child.name.startswith("step-")
            is_unmarked = _STEP_DIR.match(child.name) and not (child / COMPLETE_MARKER).exists()
            if child.is_dir() and (is_tmp or is_unmarked):
                log.warning("removing unfinished checkpoint %s", child)
                shutil.rmtree(child, ignore_errors=True)

    # -- save ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        *,
        final: bool = False,
    ) -> None:
        """Write ``step-N`` (collective: every rank calls it with the same step)."""
        self.wait()
        start = time.monotonic()
        tmp = self.root / f"step-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank}.pt")
        if self.rank == 0:
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        if self.async_save:
            response: Any = dcp_async_save(
                state, checkpoint_id=tmp, process_group=self._async_group
            )
            # Newer torch returns a response object whose upload future means "on disk".
            future = getattr(response, "upload_completion", response)
            self._pending = (future, step, final, start)
        else:
            dcp_save(state, checkpoint_id=tmp)
            self._publish(step, final, start)

    def wait(self) -> None:
        """Finish (and publish) an in-flight async save, if any."""
        if self._pending is None:
            return
        future, step, final, start = self._pending
        self._pending = None
        future.result()
        self._publish(step, final, start)

    def _publish(self, step: int, final: bool, start: float) -> None:
        hold_step, _, hold_seconds = os.environ.get(SAVE_HOLD_ENV, "").partition(":")
        if hold_step and int(hold_step) == step:
            time.sleep(float(hold_seconds))
        dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            tmp = self.root / f"step-{step}.tmp"
            target = self.root / f"step-{step}"
            if target.exists():
                _remove_checkpoint(target)
            tmp.rename(target)
            _fsync_dir(self.root)
            payload = {"step": step, "final": final, "worldSize": dist.get_world_size()}
            _write_marker(target / COMPLETE_MARKER, payload)
            self._apply_retention()
        dist.barrier()
        seconds = time.monotonic() - start
        log.info("checkpoint step-%d saved in %.2fs", step, seconds)
        if self.on_saved is not None:
            self.on_saved(step, seconds)

    def _apply_retention(self) -> None:
        done = list_complete(self.root)
        keep = retained(done, self.keep)
        for c in done:
            if c.step not in keep:
                _remove_checkpoint(c.path)

    # -- load ---------------------------------------------------------------------------

    def load_latest(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        """Restore the newest loadable checkpoint; returns its trainer state or None.

        A checkpoint that fails to load (truncated shard, unreadable state) is skipped and
        the previous one is tried, newest to oldest.
        """
        candidates = list_complete(self.root)
        for info in reversed(candidates):
            error: BaseException | None = None
            try:
                trainer_state = self._load(info.path, model, optimizer)
            # Any failure means "try the previous one". CheckpointException derives from
            # BaseException, so it needs naming.
            except (Exception, CheckpointException) as exc:
                error = exc
            failed = all_ranks_agree(error is not None, _device_of(model))
            if not failed:
                log.info("resuming from %s (step %d)", info.path, info.step)
                return trainer_state
            log.warning(
                "checkpoint %s could not be loaded (%s); falling back to the previous one",
                info.path,
                error or "failed on another rank",
            )
        if candidates:
            raise CheckpointError(
                f"none of the {len(candidates)} checkpoints under {self.root} could be loaded; "
                "move the damaged ones aside or start from a fresh checkpoint directory"
            )
        return None

    def _load(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        trainer_state: dict[str, Any] = json.loads((path / TRAINER_STATE_FILE).read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        dcp_load(state, checkpoint_id=path)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        rng_file = path / "rng" / f"rank-{self.rank}.pt"
        if rng_file.exists():
            # weights_only=False: the file holds Python and numpy RNG tuples, written by us.
            set_rng_state(torch.load(rng_file, weights_only=False))
        return trainer_state


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def export_for_serving(
    model: nn.Module,
    cfg: ModelConfig,
    tokenizer_path: str | Path | None,
    root: str | Path,
    *,
    step: int,
    dtype: torch.dtype,
    name: str = EXPORT_DIR,
) -> Path:
    """Gather full weights and publish a HF Llama checkpoint at ``<root>/<name>`` (collective).

    ``name`` is ``export`` for the final model, ``exports/step-N`` for a step's snapshot.

    The directory appears complete or not at all: it is written as ``export.tmp``, the old
    export (if any) is moved aside, the new one renamed into place, ``COMPLETE`` written last.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_sd: dict[str, Any] = get_model_state_dict(model, options=options)
    out = Path(root) / name
    if dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp")
        old = out.with_name(f"{out.name}.old")
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(full_sd, cfg, tokenizer_path, tmp, dtype=dtype)
        info = {
            "format": "hf-llama",
            "step": step,
            "modelConfig": cfg.to_dict(),
            "dtype": str(dtype).removeprefix("torch."),
        }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            (out / COMPLETE_MARKER).unlink(missing_ok=True)
            out.rename(old)
        tmp.rename(out)
        _fsync_dir(out.parent)
        _write_marker(out / COMPLETE_MARKER, {"step": step})
        shutil.rmtree(old, ignore_errors=True)
        log.info("exported step %d to %s", step, out)
    dist.barrier()
    return out
