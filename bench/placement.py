"""Placement engine micro-benchmark: one gang on a large snapshot, and a whole queue.

Pure functions only (no cluster). Writes bench/results/placement.json. The large case: a
512-pod gang, rack required and NVLink clique preferred, over 5,000 nodes (racks of 72 hosts,
cliques of 18) with 20,000 one-GPU pods already running.
    nice -n 10 .venv/bin/python bench/placement.py [--nodes 1000] [--queue 300] [--large-nodes 5000]

A snapshot keeps what placement derives from it (label indexes, per-shape slot counts, answers),
so one gang is timed three ways: ``cold``, on a new snapshot of the same nodes every run (what
the first gang of an admission pass pays); ``indexed``, after a gang of another size was placed
on the same snapshot (indexes built, this gang's answer not: what a later gang of the pass
pays); ``repeat``, the same gang again (the memo answers). ``admit`` always starts from new
snapshots, as every admission pass does. ``before`` holds the figures of the engine that
regrouped every node per level per gang, measured with the same command on the same machine;
a run keeps it when it rewrites the file.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from phalanx.placement import (
    CapacitySnapshot,
    GangRequest,
    NodeInfo,
    Placement,
    Topology,
    admit,
    place_gang,
)

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


def nvl_cluster(
    nodes: int, running_pods: int, seed: int
) -> tuple[CapacitySnapshot, CapacitySnapshot]:
    """`nodes` hosts of 8 GPUs in racks of 72 (four NVLink cliques of 18), with
    `running_pods` one-GPU pods already spread over them at random."""
    rng = random.Random(seed)
    used = [0] * nodes
    # Jobs fill whole hosts, racks in a random order (most racks are then full or empty);
    # a tenth of the pods is scattered over any host with a free GPU.
    racks = list(range((nodes + 71) // 72))
    rng.shuffle(racks)
    order = [i for r in racks for i in range(r * 72, min(nodes, r * 72 + 72))]
    packed = running_pods - running_pods // 10
    for slot in range(packed):
        used[order[slot // 8]] += 1
    for _ in range(running_pods - packed):
        index = rng.randrange(nodes)
        while used[index] == 8:
            index = (index + 1) % nodes
        used[index] += 1
    free, total = [], []
    for index in range(nodes):
        rack = index // 72
        labels = {
            "kubernetes.io/hostname": f"n{index}",
            "nvidia.com/gpu.clique": f"r{rack}.c{index % 72 // 18}",
            "phalanx.dev/rack": f"r{rack}",
            "topology.kubernetes.io/zone": f"z{rack % 4}",
        }
        capacity = {GPU: 8, "cpu": 96000, "memory": 2 << 40, "pods": 110}
        total.append(NodeInfo(f"n{index}", labels, capacity))
        free.append(
            NodeInfo(
                f"n{index}", labels, {**capacity, GPU: 8 - used[index], "pods": 110 - used[index]}
            )
        )
    return CapacitySnapshot(tuple(free)), CapacitySnapshot(tuple(total))


def timed(
    fn: Callable[[], object], repeat: int, setup: Callable[[], object] = lambda: None
) -> list[float]:
    samples = []
    for _ in range(repeat):
        setup()
        # A collection of the garbage earlier runs left is not this run's cost.
        gc.collect()
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def summary(samples: list[float], digits: int = 2) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50": round(statistics.median(ordered) * 1000, digits),
        "p99": round(p99 * 1000, digits),
        "min": round(ordered[0] * 1000, digits),
        "max": round(ordered[-1] * 1000, digits),
        "runs": len(ordered),
    }


def fresh(snapshot: CapacitySnapshot) -> CapacitySnapshot:
    """The same nodes in a new snapshot: nothing derived from them yet."""
    return CapacitySnapshot(snapshot.nodes)


def one_gang(
    snapshot: CapacitySnapshot,
    total: CapacitySnapshot,
    request: GangRequest,
    topology: Topology,
    repeat: int,
) -> dict[str, dict[str, float]]:
    """``request`` placed cold, indexed and repeated (see the module docstring)."""
    other = replace(request, key="other", pods=request.pods - 1)
    state: dict[str, CapacitySnapshot] = {}

    def new() -> None:
        state["snapshot"] = fresh(snapshot)

    def indexed() -> None:
        new()
        place_gang(state["snapshot"], other, topology, total)

    def place() -> None:
        place_gang(state["snapshot"], request, topology, total)

    new()
    place()
    return {
        "cold": summary(timed(place, repeat, new)),
        "indexed": summary(timed(place, repeat, indexed)),
        "repeat": summary(timed(place, repeat), digits=4),
    }


def queue_of(size: int) -> list[GangRequest]:
    rng = random.Random(2)
    return [
        GangRequest(
            f"j{i}",
            rng.choice([1, 1, 2, 2, 4, 4, 8, 16, 32, 64]),
            {GPU: 8, "pods": 1},
            created=float(i),
        )
        for i in range(size)
    ]


def admit_runs(
    snapshot: CapacitySnapshot,
    total: CapacitySnapshot,
    queue: list[GangRequest],
    topology: Topology,
    repeat: int,
) -> list[float]:
    return timed(lambda: admit(fresh(snapshot), queue, topology, fresh(total)), repeat)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--queue", type=int, default=300)
    parser.add_argument("--deep-queue", type=int, default=5000, help="deepest queue timed")
    parser.add_argument("--large-nodes", type=int, default=5000)
    parser.add_argument("--running-pods", type=int, default=20000)
    parser.add_argument("--large-reps", type=int, default=50)
    args = parser.parse_args()
    topology = Topology.parse("generic")
    snapshot, total = cluster(args.nodes, 0.3, seed=1)
    gang64 = GangRequest("g64", 64, {GPU: 8, "cpu": 1000, "pods": 1})
    single = one_gang(snapshot, total, gang64, topology, 20)
    queue = queue_of(args.queue)
    whole = admit_runs(snapshot, total, queue, topology, 5)
    # How a pass grows with the depth of the queue it looks at.
    depths = {
        str(depth): summary(admit_runs(snapshot, total, queue_of(depth), topology, 3), 1)["p50"]
        for depth in (100, args.queue, 3 * args.queue, args.deep_queue)
    }
    # A 512-pod gang of one-GPU pods that must share a rack and prefers one NVLink clique,
    # on a large, busy cluster.
    nvl, nvl_total = nvl_cluster(args.large_nodes, args.running_pods, seed=3)
    gang512 = GangRequest("g512", 512, {GPU: 1, "pods": 1}, required="rack", preferred="clique")
    nvidia = Topology.parse("nvidia")
    large = one_gang(nvl, nvl_total, gang512, nvidia, args.large_reps)
    placed512 = place_gang(nvl, gang512, nvidia, nvl_total)
    decisions = admit(snapshot, queue, topology, total)
    placed = sum(1 for _, result in decisions if isinstance(result, Placement))
    result: dict[str, object] = {
        "command": "nice -n 10 .venv/bin/python bench/placement.py",
        "nodes": args.nodes,
        "place_gang64_ms": single,
        "admit_queue": args.queue,
        "admit_queue_ms": summary(whole, digits=1),
        "admit_queue_placed": placed,
        "admit_queue_depth_ms_p50": depths,
        "large_nodes": args.large_nodes,
        "large_running_pods": args.running_pods,
        "place_gang512_rack_required_clique_preferred_ms": large,
        "place_gang512_result": (
            f"{placed512.level} {placed512.domain}"
            if isinstance(placed512, Placement)
            else type(placed512).__name__
        ),
    }
    previous = RESULTS / "placement.json"
    if previous.exists():
        before = json.loads(previous.read_text()).get("before")
        if before is not None:
            result["before"] = before
    RESULTS.mkdir(exist_ok=True)
    previous.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
