"""Checkpoint discovery, retention, fallback on a damaged checkpoint, and async saves.

Training runs here are one rank inside the test process (a one-member gloo group), so they
exercise the real torch.distributed.checkpoint code without launch cost.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from trainer_testkit import export_weights, run_in_process

from phalanx_trainer.checkpoint import CheckpointInfo, list_complete, retained


def make_step(root: Path, step: int, *, complete: bool = True, final: bool = False) -> None:
    d = root / f"step-{step}"
    d.mkdir(parents=True)
    if complete:
        (d / "COMPLETE").write_text(json.dumps({"step": step, "final": final}))


def test_list_complete_ignores_unpublished(tmp_path: Path) -> None:
    make_step(tmp_path, 10)
    make_step(tmp_path, 30)
    make_step(tmp_path, 20, complete=False)  # renamed, marker never written
    (tmp_path / "step-40.tmp").mkdir()  # still being written
    (tmp_path / "export").mkdir()
    assert [c.step for c in list_complete(tmp_path)] == [10, 30]


@pytest.mark.parametrize(
    ("steps", "finals", "keep", "expected"),
    [
        ([1, 2, 3, 4], [], 2, {3, 4}),
        ([1, 2, 3, 4], [2], 1, {2, 4}),
        ([1, 2], [], 5, {1, 2}),
        ([1, 2, 3], [], 0, set()),
    ],
    ids=["newest-k", "final-always-kept", "fewer-than-k", "keep-zero"],
)
def test_retention(steps: list[int], finals: list[int], keep: int, expected: set[int]) -> None:
    infos = [CheckpointInfo(s, Path(f"step-{s}"), s in finals) for s in steps]
    assert retained(infos, keep) == expected


def args(data: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data),
        "--checkpoint-dir", str(ckpt),
        "--steps", "6",
        "--batch-size", "4",
        "--seq-len", "64",
        "--lr", "3e-3",
        "--warmup-steps", "1",
        "--checkpoint-every", "2",
        "--keep", "3",
        "--log-every", "1",
        "--metrics-port", "-1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("reference") / "ckpt"
    assert run_in_process(args(prepared_data, ckpt)) == 0
    return ckpt


def test_damaged_newest_checkpoint_falls_back_to_previous(
    prepared_data: Path, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference, ckpt)
    shutil.rmtree(ckpt / "export")
    shard = next((ckpt / "step-6").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, marker still present

    with caplog.at_level("INFO", logger="phalanx_trainer"):
        assert run_in_process(args(prepared_data, ckpt)) == 0
    assert f"checkpoint {ckpt / 'step-6'} could not be loaded" in caplog.text
    assert f"resuming from {ckpt / 'step-4'} (step 4)" in caplog.text
    expected = export_weights(reference)
    for name, weight in export_weights(ckpt).items():
        assert torch.equal(weight, expected[name]), name


def test_async_checkpoint_resumes_exactly(
    prepared_data: Path, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt"
    assert run_in_process(args(prepared_data, ckpt, "--async-save")) == 0
    assert [c.step for c in list_complete(ckpt)] == [2, 4, 6]
    # Step 4 was written in the background while steps 5 and 6 trained; resume from it.
    shutil.rmtree(ckpt / "step-6")
    shutil.rmtree(ckpt / "export")
    with caplog.at_level("INFO", logger="phalanx_trainer"):
        assert run_in_process(args(prepared_data, ckpt, "--async-save")) == 0
    assert f"resuming from {ckpt / 'step-4'} (step 4)" in caplog.text
    expected = export_weights(reference)
    for name, weight in export_weights(ckpt).items():
        assert torch.equal(weight, expected[name]), name


def test_restart_after_completion_does_nothing(
    prepared_data: Path, reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference, ckpt)
    before = (ckpt / "export" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="phalanx_trainer"):
        assert run_in_process(args(prepared_data, ckpt)) == 0
    assert "resuming from" in caplog.text
    assert "exported step" not in caplog.text
    assert (ckpt / "export" / "model.safetensors").stat().st_mtime_ns == before


def test_export_layout(reference: Path) -> None:
    export = reference / "export"
    names = {p.name for p in export.iterdir()}
    assert {
        "COMPLETE",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "phalanx.json",
    } <= names
    info = json.loads((export / "phalanx.json").read_text())
    assert info["step"] == 6
    assert info["format"] == "hf-llama"
    assert not (reference / "export.tmp").exists()
