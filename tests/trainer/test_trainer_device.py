"""Devices and backends: a requested accelerator is found or the run fails with InvalidConfig.

The NPU path needs torch_npu and Ascend hardware, neither of which this suite has; what runs
here is everything up to them: the refusal without torch_npu, and the HCCL rank table the
operator renders, read back by the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_testkit import run_in_process

from phalanx.render.hccl import DEVICE_ANNOTATION, rank_table
from phalanx_trainer.distributed import (
    RankTable,
    check_rank_table,
    import_torch_npu,
    parse_rank_table,
    pick_device,
    wait_for_rank_table,
)
from phalanx_trainer.termination import InvalidConfig

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
no_torch_npu = pytest.mark.skipif(import_torch_npu(), reason="torch_npu is installed")


@no_cuda
def test_requested_cuda_without_a_gpu_is_invalid_config() -> None:
    with pytest.raises(InvalidConfig, match="no CUDA device is visible"):
        pick_device("cuda", 0, {})


@no_torch_npu
@pytest.mark.parametrize(
    ("requested", "environ"),
    [("npu", {}), ("auto", {"RANK_TABLE_FILE": "/etc/phalanx/hccl/hccl.json"})],
    ids=["explicit-npu", "auto-with-rank-table"],
)
def test_requested_npu_without_torch_npu_is_invalid_config(
    requested: str, environ: dict[str, str]
) -> None:
    with pytest.raises(InvalidConfig, match="torch_npu is not installed"):
        pick_device(requested, 0, environ)


@no_cuda
def test_auto_without_accelerators_is_the_cpu() -> None:
    assert pick_device("auto", 0, {}) == torch.device("cpu")


@no_cuda
def test_trainer_exits_invalid_config_when_the_gpu_is_missing(
    prepared_data: Path, tmp_path: Path
) -> None:
    log = tmp_path / "termination-log"
    args = ["--device", "cuda", "--data", str(prepared_data), "--checkpoint-dir", str(tmp_path)]
    assert run_in_process(args, {"PHALANX_TERMINATION_LOG": str(log)}) == 2
    record = json.loads(log.read_text())
    assert record["reason"] == "InvalidConfig"
    assert "no CUDA device is visible" in record["message"]


def ascend_pod(rank: int, devices: int) -> dict[str, object]:
    allocated = [{"device_id": str(i), "device_ip": f"10.0.{rank}.{i}"} for i in range(devices)]
    return {
        "metadata": {"annotations": {DEVICE_ANNOTATION: json.dumps({"devices": allocated})}},
        "status": {"hostIP": f"192.168.0.{rank}", "podIP": f"10.1.0.{rank}"},
    }


def test_the_operators_rank_table_reads_back() -> None:
    doc = rank_table([ascend_pod(0, 8), ascend_pod(1, 8)], 8)
    table = parse_rank_table(json.loads(json.dumps(doc)))
    assert table == RankTable(servers=2, rank_ids=tuple(range(16)))
    check_rank_table(table, 16)
    with pytest.raises(InvalidConfig, match="lists 16 devices on 2 servers"):
        check_rank_table(table, 8)


def test_an_initializing_rank_table_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "hccl.json"
    path.write_text(json.dumps(rank_table([ascend_pod(0, 8), None], 8)))
    assert parse_rank_table(json.loads(path.read_text())) is None
    with pytest.raises(InvalidConfig, match="still says 'initializing'"):
        wait_for_rank_table(path, timeout_s=0.0)


@pytest.mark.parametrize(
    "doc",
    [
        {"status": "completed", "server_list": [{"device": [{"rank_id": "1"}]}]},
        {"status": "completed"},
        {"status": "broken"},
    ],
    ids=["rank-ids-not-dense", "no-servers", "unknown-status"],
)
def test_a_malformed_rank_table_is_invalid_config(doc: dict[str, object]) -> None:
    with pytest.raises(InvalidConfig):
        parse_rank_table(doc)
