"""The /progress contract the operator polls, and the Prometheus metric names."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from phalanx_trainer.metrics import TrainMetrics, mfu, peak_flops_for


@pytest.fixture
def served() -> tuple[TrainMetrics, str]:
    metrics = TrainMetrics(total_steps=100)
    port = metrics.serve(0, host="127.0.0.1")
    yield metrics, f"http://127.0.0.1:{port}"
    metrics.close()


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.headers["Content-Type"], resp.read()


def test_progress_before_the_first_step(served: tuple[TrainMetrics, str]) -> None:
    _, base = served
    content_type, body = get(base + "/progress")
    assert content_type == "application/json"
    assert json.loads(body) == {
        "step": 0,
        "totalSteps": 100,
        "loss": None,
        "tokensPerSecond": None,
        "mfu": None,
        "lastCheckpointStep": None,
        "etaSeconds": None,
        "exportSteps": [],
        "exportPath": None,
    }


def test_progress_and_metrics_after_steps(served: tuple[TrainMetrics, str]) -> None:
    metrics, base = served
    metrics.record_step(
        step=10, loss=2.5, lr=1e-3, tokens_per_second=1000.0, mfu=0.4, eta_seconds=90.0
    )
    metrics.record_checkpoint(10, 1.5)
    metrics.record_exports([10, 5], "export")
    assert json.loads(get(base + "/progress")[1]) == {
        "step": 10,
        "totalSteps": 100,
        "loss": 2.5,
        "tokensPerSecond": 1000.0,
        "mfu": 0.4,
        "lastCheckpointStep": 10,
        "etaSeconds": 90.0,
        "exportSteps": [5, 10],
        "exportPath": "export",
    }
    text = get(base + "/metrics")[1].decode()
    for line in (
        "phalanx_train_loss 2.5",
        "phalanx_train_tokens_per_second 1000.0",
        "phalanx_train_mfu 0.4",
        "phalanx_train_step 10.0",
        "phalanx_train_learning_rate 0.001",
        "phalanx_checkpoint_save_seconds_count 1.0",
    ):
        assert line in text


def test_non_finite_loss_is_reported_as_null(served: tuple[TrainMetrics, str]) -> None:
    metrics, base = served
    metrics.record_step(
        step=1, loss=float("nan"), lr=0.0, tokens_per_second=None, mfu=None, eta_seconds=None
    )
    assert json.loads(get(base + "/progress")[1])["loss"] is None


def test_mfu_is_unknown_on_cpu() -> None:
    assert peak_flops_for(torch.device("cpu")) is None
    assert mfu(1000.0, 6e6, None) is None
    assert mfu(1e5, 6e9, 989e12) == pytest.approx(1e5 * 6e9 / 989e12)
