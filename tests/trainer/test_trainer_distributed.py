"""Real multi-process training on CPU/gloo: DDP vs 1 process, FSDP2 vs DDP, crash and resume.

All runs share one configuration (``run_args``); the uninterrupted 2-rank DDP run is the
reference the interrupted runs must reproduce bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from trainer_testkit import (
    child_pids,
    export_weights,
    launch,
    losses,
    records,
    run_in_process,
    run_ok,
    torchrun,
    val_losses,
    wait_for,
)

from phalanx_trainer.checkpoint import list_complete

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 15
CHECKPOINT_EVERY = 3
# Log intervals that checkpoints do not divide: a resume lands inside an interval.
LOG_EVERY = 4
EVAL_EVERY = 5
GLOBAL_BATCH = 4
# Same samples per step, different reduction order (gloo all-reduce of gradients):
# the fp32 loss curves agree to within this.
LOSS_RTOL = 1e-4


def run_args(data: Path, ckpt: Path, batch_size: int, *extra: str) -> list[str]:
    """The shared configuration; ``batch_size`` is per rank and per micro-step."""
    return [
        "--data", str(data),
        "--checkpoint-dir", str(ckpt),
        "--steps", str(STEPS),
        "--batch-size", str(batch_size),
        "--seq-len", "64",
        "--lr", "3e-3",
        "--warmup-steps", "2",
        "--checkpoint-every", str(CHECKPOINT_EVERY),
        "--keep", "2",
        "--log-every", str(LOG_EVERY),
        "--eval-every", str(EVAL_EVERY),
        "--eval-samples", "8",
        "--metrics-port", "-1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def single_run(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    assert run_in_process(run_args(prepared_data, out / "ckpt", GLOBAL_BATCH)) == 0
    return out / "ckpt"


@pytest.fixture(scope="module")
def ddp_run(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    run_ok(2, run_args(prepared_data, out / "ckpt", GLOBAL_BATCH // 2), out / "logs")
    return out / "ckpt"


def assert_same_curve(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == list(range(1, STEPS + 1))
    assert sorted(b) == sorted(a)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), f"step {step}"


def deterministic(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """A log without its timings, which no two runs share."""
    return [{k: v for k, v in r.items() if k not in ("tokensPerSecond", "mfu")} for r in records]


def interval_lines(log: str) -> dict[int, str]:
    """step -> the interval line's deterministic part ("loss ... | gnorm ... | lr ...")."""
    out = {}
    for m in re.finditer(r"step (\d+)/\d+ \| (loss \S+ \| gnorm \S+ \| lr \S+)", log):
        out[int(m.group(1))] = m.group(2)
    return out


def test_two_rank_ddp_matches_one_process_with_same_global_batch(
    single_run: Path, ddp_run: Path
) -> None:
    assert_same_curve(losses(single_run), losses(ddp_run))
    # The fixed val set is the same sequences whatever the world size.
    single_val, ddp_val = val_losses(single_run), val_losses(ddp_run)
    assert sorted(single_val) == [5, 10, 15]
    for step, value in single_val.items():
        assert ddp_val[step] == pytest.approx(value, rel=LOSS_RTOL), step
    single, ddp = export_weights(single_run), export_weights(ddp_run)
    for name, weight in single.items():
        torch.testing.assert_close(ddp[name], weight, atol=1e-4, rtol=1e-3, msg=name)


def test_grad_accumulation_matches_one_large_batch(
    prepared_data: Path, single_run: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    args = run_args(prepared_data, ckpt, 1, "--grad-accum", str(GLOBAL_BATCH))
    assert run_in_process(args) == 0  # one process, 4 micro-steps of 1 sequence
    assert_same_curve(losses(single_run), losses(ckpt))


def test_fsdp2_matches_ddp(prepared_data: Path, ddp_run: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_ok(
        2,
        run_args(prepared_data, ckpt, GLOBAL_BATCH // 2, "--parallelism", "fsdp"),
        tmp_path / "logs",
    )
    assert_same_curve(losses(ddp_run), losses(ckpt))


def test_retention_keeps_newest_and_final(ddp_run: Path) -> None:
    steps = [c.step for c in list_complete(ddp_run)]
    assert steps == [STEPS - CHECKPOINT_EVERY, STEPS]  # --keep 2; the final is the newest


def test_sigkill_one_rank_then_relaunch_resumes_exactly(
    prepared_data: Path, ddp_run: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    args = run_args(prepared_data, ckpt, GLOBAL_BATCH // 2)
    agent = torchrun(2, args, tmp_path / "first.log")
    try:
        wait_for(
            lambda: (ckpt / f"step-{2 * CHECKPOINT_EVERY}" / "COMPLETE").exists(),
            timeout=180,
            alive=lambda: agent.poll() is None,
        )
        workers = child_pids(agent.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        assert agent.wait(timeout=120) != 0  # torchrun tears the gang down
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    newest = list_complete(ckpt)[-1].step
    assert newest < STEPS, "the kill landed after training finished"

    relaunched = torchrun(2, args, tmp_path / "second.log")
    assert relaunched.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()
    log = (tmp_path / "second.log").read_text()
    assert f"resuming from {ckpt / f'step-{newest}'} (step {newest})" in log
    expected = export_weights(ddp_run)
    for name, weight in export_weights(ckpt).items():
        assert torch.equal(weight, expected[name]), name
    # The log reads as one run: each step once, in order, equal to the uninterrupted log
    # (losses, gradient norms, learning rates, validation), intervals ending where its end.
    resumed, reference = records(ckpt), records(ddp_run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert deterministic(resumed) == deterministic(reference)
    with_throughput = [r["step"] for r in resumed if "tokensPerSecond" in r]
    assert with_throughput == [r["step"] for r in reference if "tokensPerSecond" in r]
    # The first interval after the resume averages all of its steps, not only the redone ones.
    uninterrupted = interval_lines((ddp_run.parent / "logs" / "rank0.log").read_text())
    after_resume = interval_lines(log)
    assert sorted(after_resume) == [s for s in sorted(uninterrupted) if s > newest]
    for step, line in after_resume.items():
        assert line == uninterrupted[step], step


def test_sigkill_during_save_keeps_previous_checkpoint(
    prepared_data: Path, ddp_run: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    args = run_args(prepared_data, ckpt, GLOBAL_BATCH // 2)
    held = 2 * CHECKPOINT_EVERY
    tmp_dir = ckpt / f"step-{held}.tmp"
    # Writing step-6 finishes, then publishing it stalls (slow storage) until we kill.
    gang = launch(2, args, tmp_path / "first", {"PHALANX_TRAIN_SAVE_HOLD": f"{held}:600"})
    try:
        wait_for(
            lambda: (tmp_dir / ".metadata").exists() and len(list(tmp_dir.glob("rng/*"))) == 2,
            timeout=180,
            alive=gang.alive,
        )
    finally:
        gang.kill()
    assert [c.step for c in list_complete(ckpt)] == [CHECKPOINT_EVERY]

    second = run_ok(2, args, tmp_path / "second")
    log = second.log()
    assert f"removing unfinished checkpoint {tmp_dir}" in log
    assert f"resuming from {ckpt / f'step-{CHECKPOINT_EVERY}'} (step {CHECKPOINT_EVERY})" in log
    expected = export_weights(ddp_run)
    for name, weight in export_weights(ckpt).items():
        assert torch.equal(weight, expected[name]), name


def test_sigterm_saves_and_exits_nonzero(prepared_data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    args = run_args(prepared_data, ckpt, GLOBAL_BATCH, "--checkpoint-every", "0", "--steps", "500")
    termination_log = tmp_path / "termination-log"
    gang = launch(1, args, tmp_path / "logs", {"PHALANX_TERMINATION_LOG": str(termination_log)})
    try:
        wait_for(lambda: (ckpt / "train_log.jsonl").exists(), timeout=180, alive=gang.alive)
        gang.procs[0].send_signal(signal.SIGTERM)  # what the kubelet sends a deleted pod
        codes = gang.wait(timeout=120)
    finally:
        gang.kill()
    assert codes == [128 + signal.SIGTERM], gang.log()
    saved = list_complete(ckpt)
    assert len(saved) == 1
    assert 0 < saved[0].step < 500
    assert not saved[0].final
    assert "stop requested" in gang.log()
    record = json.loads(termination_log.read_text())
    assert (record["exitCode"], record["reason"]) == (128 + signal.SIGTERM, "Stopped")
    assert f"step-{saved[0].step}" in record["message"]


def test_fsdp2_mixed_precision_tracks_ddp_autocast(prepared_data: Path, tmp_path: Path) -> None:
    """bf16 on CPU: FSDP2's MixedPrecisionPolicy (bf16 params in compute, fp32 reduce) against
    DDP autocasting over fp32 weights; both are bf16 matmuls, so the curves agree to bf16's
    precision, and both export bf16 weights."""
    curves = {}
    for name in ("ddp", "fsdp"):
        ckpt = tmp_path / name / "ckpt"
        args = run_args(
            prepared_data, ckpt, GLOBAL_BATCH // 2, "--parallelism", name, "--precision", "bf16"
        )
        gang = run_ok(2, args, tmp_path / name / "logs")
        curves[name] = losses(ckpt)
        weights = export_weights(ckpt)
        assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert "precision bf16 (FSDP mixed precision)" in gang.log()
    assert sorted(curves["fsdp"]) == list(range(1, STEPS + 1))
    for step, loss in curves["ddp"].items():
        assert curves["fsdp"][step] == pytest.approx(loss, rel=2e-2), step
