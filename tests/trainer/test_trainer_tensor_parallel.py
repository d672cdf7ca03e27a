"""Tensor parallelism composed with FSDP2 on a 2-D (dp, tp) mesh, on CPU with gloo.

2 x 2 = 4 processes against one process with the same global batch, and checkpoints moved
between meshes (DCP reshards DTensor shards on load).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from trainer_testkit import (
    TORCHRUN,
    base_env,
    export_weights,
    free_port,
    launch,
    losses,
    records,
    run_in_process,
    run_ok,
)

from phalanx_trainer.checkpoint import list_complete

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 8
CHECKPOINT_EVERY = 4
GLOBAL_BATCH = 4
# TP splits the matmuls' reduction dimension (wo, w2) across ranks, so sums are added in
# another order than in one process; fp32 curves still agree to this over 8 steps.
LOSS_RTOL = 1e-4


def run_args(data: Path, ckpt: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "--data", str(data),
        "--checkpoint-dir", str(ckpt),
        "--steps", str(STEPS),
        "--batch-size", str(batch_size),
        "--seq-len", "32",
        "--lr", "3e-3",
        "--warmup-steps", "2",
        "--checkpoint-every", str(CHECKPOINT_EVERY),
        "--keep", "3",
        "--log-every", "2",
        "--eval-every", "4",
        "--eval-samples", "4",
        "--metrics-port", "-1",
        *extra,
    ]  # fmt: skip


TP_FLAGS = ("--parallelism", "fsdp", "--tensor-parallel", "2")


@pytest.fixture(scope="module")
def single_run(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("single") / "ckpt"
    assert run_in_process(run_args(prepared_data, ckpt, GLOBAL_BATCH)) == 0
    return ckpt


@pytest.fixture(scope="module")
def tp_run(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tp")
    # dp 2 x tp 2: two data-parallel groups of 2 sequences each, as one process's 4.
    args = run_args(prepared_data, out / "ckpt", GLOBAL_BATCH // 2, *TP_FLAGS)
    gang = run_ok(4, args, out / "logs", timeout=600)
    assert "mesh dp=2 x tp=2" in gang.log()
    return out / "ckpt"


def assert_close_curves(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), step


def test_2x2_mesh_matches_one_process(single_run: Path, tp_run: Path) -> None:
    assert_close_curves(losses(single_run), losses(tp_run))
    single_val = {r["step"]: r["valLoss"] for r in records(single_run) if "valLoss" in r}
    tp_val = {r["step"]: r["valLoss"] for r in records(tp_run) if "valLoss" in r}
    assert sorted(tp_val) == sorted(single_val) == [4, 8]
    for step, value in single_val.items():
        assert tp_val[step] == pytest.approx(value, rel=LOSS_RTOL), step
    # Gradient norms (computed over both meshes) agree with the single process's.
    single_norms = {r["step"]: r["gradNorm"] for r in records(single_run)}
    for r in records(tp_run):
        assert r["gradNorm"] == pytest.approx(single_norms[r["step"]], rel=1e-3), r["step"]
    # The export gathers the TP x FSDP shards into the same full weights.
    single, tp = export_weights(single_run), export_weights(tp_run)
    assert sorted(tp) == sorted(single)
    for name, weight in single.items():
        torch.testing.assert_close(tp[name], weight, atol=1e-4, rtol=1e-3, msg=name)


def test_tp_checkpoint_resumes_in_one_process(
    prepared_data: Path, single_run: Path, tp_run: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tp_run, ckpt)
    for info in list_complete(ckpt):
        if info.step > CHECKPOINT_EVERY:
            shutil.rmtree(info.path)
    shutil.rmtree(ckpt / "export")
    assert run_in_process(run_args(prepared_data, ckpt, GLOBAL_BATCH)) == 0
    assert_close_curves(losses(single_run), losses(ckpt))


def test_one_process_checkpoint_resumes_on_a_2x2_mesh(
    prepared_data: Path, single_run: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(single_run, ckpt)
    for info in list_complete(ckpt):
        if info.step > CHECKPOINT_EVERY:
            shutil.rmtree(info.path)
    shutil.rmtree(ckpt / "export")
    args = run_args(prepared_data, ckpt, GLOBAL_BATCH // 2, *TP_FLAGS)
    gang = launch(4, args, tmp_path / "logs")
    assert gang.wait(600) == [0, 0, 0, 0], gang.log()
    assert f"resuming from {ckpt / f'step-{CHECKPOINT_EVERY}'}" in gang.log()
    assert_close_curves(losses(single_run), losses(ckpt))


META_INIT_ON_A_TP_MESH = """
import json, sys
import torch, torch.distributed as dist
from phalanx_trainer.model import ModelConfig, Transformer
from phalanx_trainer.parallel import parallelize
dist.init_process_group("gloo")
cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  max_seq_len=32, tie_embeddings=True)
with torch.device("meta"):
    model = Transformer(cfg)
wrapped = parallelize(model, parallelism="fsdp", device=torch.device("cpu"), tensor_parallel=2)
model.to_empty(device="cpu")
model.init_weights()
tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
loss = wrapped(tokens[:, :-1], targets=tokens[:, 1:])
loss.backward()
wq = model.layers[0].attention.wq.weight.full_tensor()
norm = model.norm.weight.full_tensor()
if dist.get_rank() == 0:
    json.dump({"wqStd": wq.std().item(), "norm": norm.tolist(), "loss": loss.item()},
              open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


def test_large_model_path_meta_init_after_tp_and_fsdp(tmp_path: Path) -> None:
    """Models over 500M parameters are built on the meta device, split and sharded, then
    initialised shard by shard; on a TP mesh the shards get the same distribution."""
    script = tmp_path / "meta_init.py"
    script.write_text(META_INIT_ON_A_TP_MESH)
    out = tmp_path / "out.json"
    agent = subprocess.run(
        [TORCHRUN, "--nproc-per-node=2", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script), str(out)],
        env=base_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert agent.returncode == 0, agent.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["wqStd"] == pytest.approx(0.02, rel=0.25)  # N(0, 0.02), 1024 samples
    assert got["norm"] == [1.0] * 32
    assert got["loss"] == pytest.approx(math.log(97), rel=0.05)  # near-uniform at init
