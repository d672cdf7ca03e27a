from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from phalanx.devcluster import build
from phalanx.devcluster.cluster import DevCluster, summarize_nodes
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.processes import PidRecord, ProcessState, process_start_ticks
from phalanx.devcluster.versions import ALL_BINARIES, KUBERNETES_VERSION


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stamped stand-ins for the binaries, so `up` gets past its binary check."""
    monkeypatch.setenv("PHALANX_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "bin" / KUBERNETES_VERSION
    target.mkdir(parents=True)
    for binary in ALL_BINARIES:
        (target / binary.name).write_text("#!/bin/sh\n")
        (target / binary.name).chmod(0o755)
    stamp = {b.name: {"package": b.package, "version": b.version} for b in ALL_BINARIES}
    (target / build.STAMP_NAME).write_text(json.dumps(stamp))
    return target


def node(name: str, ready: bool, **allocatable: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "allocatable": allocatable,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_up_refuses_a_stale_pid_file_and_names_the_fix(built: Path, tmp_path: Path) -> None:
    cluster = DevCluster(tmp_path / "c")
    pid_file = cluster.layout.pid_file("kube-apiserver")
    pid_file.parent.mkdir(parents=True)
    ticks = process_start_ticks(os.getpid())
    assert ticks is not None
    pid_file.write_text(PidRecord(os.getpid(), ticks + 1, "/gone/kube-apiserver").to_json())

    with pytest.raises(DevClusterError, match=r"stale PID file .*kube-apiserver") as error:
        cluster.up()
    assert f"run `phalanx dev down --dir {tmp_path / 'c'}` first" in str(error.value)


def test_down_clears_stale_pid_files_and_is_idempotent(tmp_path: Path) -> None:
    cluster = DevCluster(tmp_path / "c")
    pid_file = cluster.layout.pid_file("etcd")
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(PidRecord(2**22 + 1, 1, "/gone/etcd").to_json())

    assert cluster.down() == []
    assert cluster.down() == []
    assert cluster.status().components[0].state is ProcessState.STOPPED


def test_status_without_a_cluster_reports_every_component_stopped(tmp_path: Path) -> None:
    status = DevCluster(tmp_path / "nothing").status()

    assert [c.state for c in status.components] == [ProcessState.STOPPED] * 5
    assert status.nodes is None
    assert not status.running


def test_node_summary_counts_accelerators_of_ready_nodes_only() -> None:
    summary = summarize_nodes(
        [
            node("a", True, **{"nvidia.com/gpu": "8"}),
            node("b", True, **{"nvidia.com/gpu": "8"}),
            node("c", False, **{"nvidia.com/gpu": "8"}),
            node("d", True, **{"huawei.com/Ascend910": "8"}),
        ]
    )

    assert (summary.total, summary.ready) == (4, 3)
    assert summary.accelerators == {"nvidia.com/gpu": 16, "huawei.com/Ascend910": 8}


class _NodeLister:
    """Answers GET /api/v1/nodes with the next listing, repeating the last one."""

    def __init__(self, *listings: list[dict[str, Any]]) -> None:
        self.listings = list(listings)
        self.calls = 0

    def get(self, path: str) -> Any:
        listing = self.listings[min(self.calls, len(self.listings) - 1)]
        self.calls += 1
        return type("Reply", (), {"json": lambda _self: {"items": listing}})()


def test_up_waits_until_ready_nodes_lose_the_not_ready_taint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Right after registration a node is Ready while the node lifecycle controller still has
    # its not-ready taint on: kube-scheduler binds nothing there yet.
    tainted = node("a", True)
    tainted["spec"] = {"taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]}
    lister = _NodeLister([tainted], [tainted], [node("a", True)])
    monkeypatch.setattr("phalanx.devcluster.cluster.time.sleep", lambda _: None)

    DevCluster(tmp_path / "c")._wait_nodes_ready(lister, {"a"}, [], deadline=float("inf"))  # type: ignore[arg-type]

    assert lister.calls == 3
