"""The /progress contract the operator polls, the Prometheus series, and the MFU peak."""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest
from trainer_testkit import free_ports, launch, progress_of, records, wait_for

from phalanx_trainer.metrics import TrainMetrics, mfu, peak_flops_for, resolve_peak_flops

BEFORE_THE_FIRST_STEP = {
    "step": 0,
    "totalSteps": 100,
    "loss": None,
    "tokensPerSecond": None,
    "mfu": None,
    "lastCheckpointStep": None,
    "etaSeconds": None,
    "exportSteps": [],
    "exportPath": None,
    "rank": 0,
    "gradNorm": None,
    "stepSeconds": None,
    "ownStepSeconds": None,
    "checkpointStallSeconds": 0.0,
    "valLoss": None,
    "valPerplexity": None,
    "valStep": None,
}


@pytest.fixture
def served() -> Iterator[tuple[TrainMetrics, str]]:
    metrics = TrainMetrics(total_steps=100, rank=0)
    port = metrics.serve(0, host="127.0.0.1")
    yield metrics, f"http://127.0.0.1:{port}"
    metrics.close()


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.headers["Content-Type"], resp.read()


def samples(text: str) -> set[str]:
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def test_progress_before_the_first_step(served: tuple[TrainMetrics, str]) -> None:
    _, base = served
    content_type, body = get(base + "/progress")
    assert content_type == "application/json"
    assert json.loads(body) == BEFORE_THE_FIRST_STEP


def test_unknown_values_are_absent_not_zero(served: tuple[TrainMetrics, str]) -> None:
    metrics, base = served
    metrics.record_step(
        step=10, loss=2.5, lr=1e-3, tokens_per_second=1000.0, mfu=None, eta_seconds=90.0
    )
    text = get(base + "/metrics")[1].decode()
    assert "phalanx_train_loss{" in text
    for absent in ("phalanx_train_mfu{", "phalanx_train_grad_norm{", "phalanx_train_val_loss{"):
        assert absent not in text, absent


def test_progress_and_metrics_after_steps(served: tuple[TrainMetrics, str]) -> None:
    metrics, base = served
    metrics.record_step(
        step=10,
        loss=2.5,
        lr=1e-3,
        tokens_per_second=1000.0,
        mfu=0.4,
        eta_seconds=90.0,
        grad_norm=0.75,
        step_seconds=0.125,
        own_step_seconds=0.05,
    )
    metrics.record_eval(step=10, loss=3.0, perplexity=20.0)
    metrics.record_checkpoint(10, 1.5)
    metrics.record_stall(0.25)
    metrics.record_stall(0.5)
    metrics.record_exports([10, 5], "export")
    assert json.loads(get(base + "/progress")[1]) == BEFORE_THE_FIRST_STEP | {
        "step": 10,
        "loss": 2.5,
        "tokensPerSecond": 1000.0,
        "mfu": 0.4,
        "lastCheckpointStep": 10,
        "etaSeconds": 90.0,
        "exportSteps": [5, 10],
        "exportPath": "export",
        "gradNorm": 0.75,
        "stepSeconds": 0.125,
        "ownStepSeconds": 0.05,
        "checkpointStallSeconds": 0.75,
        "valLoss": 3.0,
        "valPerplexity": 20.0,
        "valStep": 10,
    }
    expected = {
        'phalanx_train_loss{rank="0"} 2.5',
        'phalanx_train_grad_norm{rank="0"} 0.75',
        'phalanx_train_tokens_per_second{rank="0"} 1000.0',
        'phalanx_train_mfu{rank="0"} 0.4',
        'phalanx_train_step_seconds{rank="0"} 0.125',
        'phalanx_train_step{rank="0"} 10.0',
        'phalanx_train_total_steps{rank="0"} 100.0',
        'phalanx_train_learning_rate{rank="0"} 0.001',
        'phalanx_train_val_loss{rank="0"} 3.0',
        'phalanx_train_val_perplexity{rank="0"} 20.0',
        'phalanx_checkpoint_save_seconds_count{rank="0"} 1.0',
    }
    assert expected <= samples(get(base + "/metrics")[1].decode())


def test_other_ranks_export_only_their_own_series() -> None:
    """Job-wide values come from rank 0 alone: a sum over a job's series counts them once."""
    metrics = TrainMetrics(total_steps=100, rank=3)
    metrics.record_step(
        step=10, loss=2.5, lr=1e-3, tokens_per_second=1000.0, mfu=0.4, eta_seconds=90.0,
        grad_norm=0.75, step_seconds=0.125,
    )  # fmt: skip
    metrics.record_eval(step=10, loss=3.0, perplexity=20.0)
    metrics.record_checkpoint(10, 1.5)
    text = generate_latest(metrics.registry).decode()
    assert {
        'phalanx_train_step{rank="3"} 10.0',
        'phalanx_train_step_seconds{rank="3"} 0.125',
        'phalanx_checkpoint_save_seconds_count{rank="3"} 1.0',
    } <= samples(text)
    for job_wide in ("loss", "tokens_per_second", "mfu", "grad_norm", "val_loss", "total_steps"):
        assert f"phalanx_train_{job_wide}{{" not in text, job_wide
    assert metrics.progress_json()["loss"] == 2.5  # /progress still has everything
    assert metrics.progress_json()["rank"] == 3


def test_non_finite_loss_is_reported_as_null(served: tuple[TrainMetrics, str]) -> None:
    metrics, base = served
    metrics.record_step(
        step=1, loss=float("nan"), lr=0.0, tokens_per_second=None, mfu=None, eta_seconds=None
    )
    assert json.loads(get(base + "/progress")[1])["loss"] is None


@pytest.mark.parametrize(
    ("explicit", "bf16", "expected"),
    [(None, True, None), (None, False, None), (2e12, False, 2e12), (2e12, True, 2e12)],
    ids=["cpu-unknown", "cpu-fp32-unknown", "explicit-fp32", "explicit-bf16"],
)
def test_explicit_peak_flops_is_used_in_any_precision(
    explicit: float | None, bf16: bool, expected: float | None
) -> None:
    assert resolve_peak_flops(explicit, torch.device("cpu"), bf16=bf16) == expected


def test_mfu_is_unknown_without_a_peak() -> None:
    assert peak_flops_for(torch.device("cpu")) is None
    assert mfu(1000.0, 6e6, None) is None
    assert mfu(1e5, 6e9, 989e12) == pytest.approx(1e5 * 6e9 / 989e12)


@pytest.mark.e2e
@pytest.mark.slow
def test_every_rank_serves_its_progress_and_explicit_peak_gives_fp32_mfu(
    prepared_data: Path, tmp_path: Path
) -> None:
    base = free_ports(2)
    args = [
        "--data", str(prepared_data),
        "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--steps", "100000",
        "--batch-size", "2",
        "--seq-len", "32",
        "--log-every", "2",
        "--eval-every", "0",
        "--checkpoint-every", "0",
        "--metrics-port", str(base),
        "--peak-flops", "1e12",  # a CPU in fp32: no table entry, but the user knows its peak
    ]  # fmt: skip
    gang = launch(2, args, tmp_path / "logs")
    try:
        wait_for(
            lambda: all(progress_of(base + r).get("stepSeconds") for r in (0, 1)),
            timeout=180,
            alive=gang.alive,
        )
        ranks = [progress_of(base + r) for r in (0, 1)]
        text = get(f"http://127.0.0.1:{base + 1}/metrics")[1].decode()
        text0 = get(f"http://127.0.0.1:{base}/metrics")[1].decode()
        for proc in gang.procs:
            proc.send_signal(signal.SIGTERM)
        codes = gang.wait(timeout=120)
    finally:
        gang.kill()
    assert codes == [128 + signal.SIGTERM] * 2, gang.log()
    assert [p["rank"] for p in ranks] == [0, 1]
    for p in ranks:
        assert p["mfu"] is not None
        assert 0 < p["mfu"] < 1
        assert p["gradNorm"] is not None
        assert p["loss"] is not None
    assert 'phalanx_train_step_seconds{rank="1"}' in text
    assert "phalanx_train_mfu{" not in text  # job-wide: rank 0's endpoint has it
    assert 'phalanx_train_mfu{rank="0"}' in text0
    logged = records(tmp_path / "ckpt")
    assert all("mfu" in r for r in logged if "tokensPerSecond" in r)
