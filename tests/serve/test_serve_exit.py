"""A server whose model cannot load exits (so the kubelet's back-off and the operator see it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from phalanx_serve.cli import LOAD_FAILED_EXIT


def test_a_model_that_cannot_load_ends_the_process_with_the_reason(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    empty = tmp_path / "model"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "phalanx_serve", "--model", str(empty), "--port", "0"],
        env={**os.environ, "PHALANX_TERMINATION_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == LOAD_FAILED_EXIT, result.stderr[-2000:]
    message = json.loads(log.read_text())
    assert message["reason"] == "ModelLoadFailed"
    assert message["exitCode"] == LOAD_FAILED_EXIT
    assert "config.json" in message["message"]
