"""End to end: the trainer trains a tiny model on CPU and exports it; ``phalanx-serve`` (a real
process) serves the export, and its greedy answer is the model's own greedy continuation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from tokenizers import Tokenizer

from phalanx_trainer.hf import load_pretrained

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def trainer_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "phalanx_trainer",
        "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
        "--checkpoint-dir", str(root / "run"), "--data-cache", str(root / "data"),
        "--metrics-port", "-1", "--checkpoint-every", "0", "--log-every", "2",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    export = root / "run" / "export"
    assert (export / "config.json").exists()
    assert (export / "tokenizer.json").exists()
    return export


@pytest.fixture(scope="module")
def served_export(trainer_export: Path) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "PHALANX_SERVE_THREADS": "1", "PHALANX_SERVE_DTYPE": "float64"}
    cmd = [
        sys.executable, "-m", "phalanx_serve", "--model", str(trainer_export),
        "--served-model-name", "trained", "--host", "127.0.0.1", "--port", str(port),
        "--max-batch-size", "4", "--max-model-len", "128", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_trainer_export_is_served_end_to_end(trainer_export: Path, served_export: str) -> None:
    models = httpx.get(served_export + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["trained"]
    assert models["data"][0]["max_model_len"] == 128

    prompt = "The return value of a function"
    body = {"model": "trained", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    answer = httpx.post(served_export + "/v1/completions", json=body, timeout=60).json()

    tokenizer = Tokenizer.from_file(str(trainer_export / "tokenizer.json"))
    model, _ = load_pretrained(trainer_export, dtype=torch.float64)
    ids = tokenizer.encode(prompt).ids
    out: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
    expected = tokenizer.decode(out)
    got = answer["choices"][0]["text"]
    # The export may stop early at its end-of-text token; up to there the text is the same.
    assert (
        expected.startswith(got)
        if answer["choices"][0]["finish_reason"] == "stop"
        else got == expected
    )
    assert answer["usage"]["prompt_tokens"] == len(ids)

    chat = {"messages": [{"role": "user", "content": "What is a module?"}], "max_tokens": 8}
    reply = httpx.post(served_export + "/v1/chat/completions", json=chat, timeout=60)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    metrics = httpx.get(served_export + "/metrics").text
    assert 'phalanx_serve_num_requests_running{model_name="trained"} 0.0' in metrics
