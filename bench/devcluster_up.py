"""Measure the local control plane: warm `up` time to all nodes Ready, idle memory and CPU.

Runs `DevCluster.up` for the default 64-node `gpu` profile and again for 1,000 nodes, each
time recording the seconds until every node is Ready and the summed RSS of all control-plane
processes after an idle settle period. Writes bench/results/devcluster_up.json.

    .venv/bin/python bench/devcluster_up.py [--nodes 64 1000] [--settle 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from phalanx.devcluster.build import ensure_binaries
from phalanx.devcluster.cluster import DevCluster
from phalanx.devcluster.versions import ETCD_VERSION, KUBERNETES_VERSION, KWOK_VERSION

RESULTS = Path(__file__).parent / "results" / "devcluster_up.json"


def measure(nodes: int, settle: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as state:
        cluster = DevCluster(Path(state))
        started = time.monotonic()
        try:
            cluster.up(profile="gpu", nodes=nodes, timeout=600)
            up_seconds = time.monotonic() - started
            before = _cpu_seconds(cluster)
            time.sleep(settle)
            idle_cpu = (_cpu_seconds(cluster) - before) / settle
            status = cluster.status()
        finally:
            cluster.down()
    assert status.nodes is not None
    return {
        "nodes": nodes,
        "up_seconds_to_all_nodes_ready": round(up_seconds, 2),
        "nodes_ready_after_settle": status.nodes.ready,
        "idle_rss_mib_total": round(status.rss_bytes / 2**20, 1),
        "idle_rss_mib": {c.name: round(c.rss_bytes / 2**20, 1) for c in status.components},
        "idle_cpu_cores": round(idle_cpu, 3),
        "settle_seconds": settle,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[64, 1000])
    parser.add_argument(
        "--settle",
        type=float,
        default=130.0,
        help="idle seconds before RSS; longer than the 120 s node grace period, so the result "
        "also shows that heartbeats keep every node Ready",
    )
    args = parser.parse_args()
    ensure_binaries(progress=print)
    runs = []
    for count in args.nodes:
        run = measure(count, args.settle)
        print(
            f"{count:>5} nodes: Ready in {run['up_seconds_to_all_nodes_ready']:.1f}s, "
            f"idle RSS {run['idle_rss_mib_total']:.0f} MiB, "
            f"idle CPU {run['idle_cpu_cores']:.2f} cores, "
            f"{run['nodes_ready_after_settle']} Ready after {run['settle_seconds']:.0f}s"
        )
        runs.append(run)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "devcluster_up",
        "versions": {"kubernetes": KUBERNETES_VERSION, "etcd": ETCD_VERSION, "kwok": KWOK_VERSION},
        "machine": {"cpus": _cpu_count(), "python": platform.python_version()},
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


def _cpu_seconds(cluster: DevCluster) -> float:
    """User + system CPU seconds used so far by every running control-plane process."""
    ticks = 0
    for component in cluster.status().components:
        if component.pid is None:
            continue
        stat = Path(f"/proc/{component.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
