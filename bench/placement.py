"""Placement engine micro-benchmark: one gang on a large snapshot, and a whole queue.

Pure functions only (no cluster). Writes bench/results/placement.json.
    python bench/placement.py [--nodes 1000] [--queue 300]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from phalanx.placement import CapacitySnapshot, GangRequest, NodeInfo, Topology, admit, place_gang

RESULTS = Path(__file__).resolve().parent / "results"
GPU = "nvidia.com/gpu"


def cluster(nodes: int, busy_share: float, seed: int) -> tuple[CapacitySnapshot, CapacitySnapshot]:
    rng = random.Random(seed)
    free, total = [], []
    for index in range(nodes):
        rack = index // 4
        block, zone = rack // 2, rack // 8
        labels = {
            "kubernetes.io/hostname": f"n{index}",
            "phalanx.dev/rack": f"r{rack}",
            "phalanx.dev/block": f"b{block}",
            "topology.kubernetes.io/zone": f"z{zone % 2}",
        }
        capacity = {GPU: 8, "cpu": 96000, "memory": 2 << 40, "pods": 110}
        used = 8 if rng.random() < busy_share else 0
        total.append(NodeInfo(f"n{index}", labels, capacity))
        free.append(NodeInfo(f"n{index}", labels, {**capacity, GPU: 8 - used}))
    return CapacitySnapshot(tuple(free)), CapacitySnapshot(tuple(total))


def timed(fn, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--queue", type=int, default=300)
    args = parser.parse_args()
    topology = Topology.parse("generic")
    snapshot, total = cluster(args.nodes, 0.3, seed=1)
    gang64 = GangRequest("g64", 64, {GPU: 8, "cpu": 1000, "pods": 1})
    single = timed(lambda: place_gang(snapshot, gang64, topology, total), 20)
    rng = random.Random(2)
    queue = [
        GangRequest(
            f"j{i}",
            rng.choice([1, 1, 2, 2, 4, 4, 8, 16, 32, 64]),
            {GPU: 8, "pods": 1},
            created=float(i),
        )
        for i in range(args.queue)
    ]
    whole = timed(lambda: admit(snapshot, queue, topology, total), 3)
    decisions = admit(snapshot, queue, topology, total)
    placed = sum(1 for _, result in decisions if hasattr(result, "nodes"))
    result = {
        "nodes": args.nodes,
        "place_gang64_ms_p50": round(statistics.median(single) * 1000, 2),
        "place_gang64_ms_max": round(max(single) * 1000, 2),
        "admit_queue": args.queue,
        "admit_queue_ms_p50": round(statistics.median(whole) * 1000, 1),
        "admit_queue_placed": placed,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "placement.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
