"""Hot spares on the local control plane: recovery onto a domain's spares, and how busy a
preemptible filler keeps the spares while no recovery needs them.

On a fake cluster (`phalanx dev up`, gpu profile, 72 kwok nodes: racks of 4) with the operator
running in this process, one job per scenario lives through every run:

1. rack (PHALANX_SPARES=rack=1): a 3-node gang confined to one rack, a 1-node preemptible
   filler on the rack's spare. Each run turns one of the gang's nodes NotReady
   (nodeLostGraceSeconds 0). Measured from the failure observed (the bench reads the node
   NotReady) to the replacement bound (every new pod has a node) and to all ranks Running;
   whether the gang stayed in its rack and restarted once; whether the filler was preempted.
2. eight (PHALANX_SPARES=cluster=8): a 64-node gang and eight 1-node preemptible fillers on
   the 8 spares. Each run turns 8 of the gang's nodes NotReady at once (from 8 threads);
   measured as above, plus the number of restarts the 8 losses cost (target: one).
3. utilisation: after each run of (2) the 8 lost nodes return and become the spares; the
   fillers preempted by the recovery wait in the queue. For the next --window s the bench samples
   every 0.25 s which spares (Ready nodes free of ordinary pods) run a filler pod: the mean is
   the spares' utilisation while idle, ramp-up included; and when every spare first ran one.

Results go to bench/results/spares.json. Usage (kwok nodes only: no lock needed):
    python bench/spares.py [--runs 10] [--window 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
RACK_LABEL = "phalanx.dev/rack"
NOT_READY = "phalanx.dev/fake-node-ready"
PREEMPTIBLE = "phalanx.dev/preemptible"


def until(predicate: Any, timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(step)
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def manifest(name: str, nodes: int, **spec: Any) -> dict[str, Any]:
    template = spec.pop("podTemplate", {})
    template.setdefault("metadata", {})["annotations"] = {
        "phalanx.dev/fake-outcome": "Succeeded",
        "phalanx.dev/fake-duration": "36000s",
    }
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "LLMTrainJob",
        "metadata": {"name": name},
        "spec": {
            "nodes": nodes,
            "processesPerNode": 1,
            "accelerator": {"type": "nvidia", "perNode": 8},
            "checkpoint": {"enabled": False},
            "podTemplate": template,
            **spec,
        },
    }


class Bench:
    def __init__(self, kubeconfig: Path) -> None:
        from kubernetes import client, config

        config.load_kube_config(str(kubeconfig))
        self.core = client.CoreV1Api()
        self.custom = client.CustomObjectsApi()

    def namespace(self, name: str) -> str:
        self.core.create_namespace({"metadata": {"name": name}})
        until(lambda: self.core.list_namespaced_service_account(name).items, 30, 0.2)
        return name

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs", body
        )

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(
            "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs", name
        )
        return dict(obj.get("status") or {})

    def gang(self, namespace: str, name: str, generation: int) -> list[Any]:
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=f"phalanx.dev/job={name},phalanx.dev/generation={generation}"
        ).items
        return [p for p in pods if not p.metadata.deletion_timestamp]

    def wait_running(
        self, namespace: str, name: str, count: int, timeout: float = 120
    ) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            status = self.status(namespace, name)
            if status.get("phase") != "Running":
                return None
            pods = self.gang(namespace, name, int(status.get("gangGeneration") or 1))
            ok = len(pods) == count and all(p.status.phase == "Running" for p in pods)
            return status if ok else None

        found = until(running, timeout, 0.2)
        assert found, f"{namespace}/{name}: not running"
        return dict(found)

    def delete(self, namespace: str, name: str) -> None:
        """Delete a job and wait until its pods are gone."""
        self.custom.delete_namespaced_custom_object(
            "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs", name
        )
        gone = until(
            lambda: (
                not self.core.list_namespaced_pod(
                    namespace, label_selector=f"phalanx.dev/job={name}"
                ).items
            ),
            120,
            0.2,
        )
        assert gone, f"{namespace}/{name}: pods left"

    def set_ready(self, nodes: list[str], ready: bool) -> None:
        value = None if ready else "false"
        threads = [
            threading.Thread(
                target=self.core.patch_node,
                args=(n, {"metadata": {"annotations": {NOT_READY: value}}}),
            )
            for n in nodes
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def not_ready(self, nodes: list[str]) -> bool:
        wanted = set(nodes)
        down = {
            n.metadata.name
            for n in self.core.list_node().items
            if n.metadata.name in wanted and not _ready(n)
        }
        return bool(down)

    def ready(self, nodes: list[str]) -> bool:
        wanted = set(nodes)
        return all(_ready(n) for n in self.core.list_node().items if n.metadata.name in wanted)


def _ready(node: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def recovery_run(
    b: Bench, ns: str, name: str, size: int, lose: int, rack_of: dict[str, str]
) -> dict[str, Any]:
    """Lose `lose` of the gang's nodes at once; time the replacement."""
    before = b.wait_running(ns, name, size)
    generation = int(before["gangGeneration"])
    restarts = int(before.get("restarts") or 0)
    placed = before["placement"]
    # The highest ranks' nodes: any node of the gang would do.
    lost = list(dict.fromkeys(placed["nodes"]))[-lose:]
    b.set_ready(lost, False)
    seen = until(lambda: b.not_ready(lost), 60, 0.02)
    observed = time.monotonic()
    assert seen, "node never NotReady"

    def bound() -> list[Any] | None:
        pods = b.gang(ns, name, generation + 1)
        return pods if len(pods) == size and all(p.spec.node_name for p in pods) else None

    fresh = until(bound, 180, 0.02)
    bound_at = time.monotonic()
    if not fresh:
        # Recorded, not raised: the figures say how many runs never recovered, and why.
        status = b.status(ns, name)
        pods = b.gang(ns, name, int(status.get("gangGeneration") or generation + 1))
        return {
            "lostNodes": lost,
            "recovered": False,
            "restarts": int(status.get("restarts") or 0) - restarts,
            "conditions": [
                f"{c['type']}={c['status']} {c['reason']}: {c['message']}"
                for c in status.get("conditions") or []
            ],
            "pods": len(pods),
            "unbound": sum(1 for p in pods if not p.spec.node_name),
        }

    def all_running() -> bool:
        pods = b.gang(ns, name, generation + 1)
        return len(pods) == size and all(p.status.phase == "Running" for p in pods)

    until(all_running, 120, 0.02)
    running_at = time.monotonic()
    after = b.wait_running(ns, name, size)
    nodes = [p.spec.node_name for p in fresh]
    print(
        f"{name}: lost {len(lost)}, bound {bound_at - observed:.2f}s, "
        f"running {running_at - observed:.2f}s",
        file=sys.stderr,
        flush=True,
    )
    return {
        "lostNodes": lost,
        "recovered": True,
        "boundSeconds": round(bound_at - observed, 3),
        "runningSeconds": round(running_at - observed, 3),
        "restarts": int(after.get("restarts") or 0) - restarts,
        "generations": int(after["gangGeneration"]) - generation,
        "domainBefore": f"{placed['level']} {placed['domain']}",
        "domainAfter": f"{after['placement']['level']} {after['placement']['domain']}",
        "stayedInDomain": placed["domain"] == after["placement"]["domain"]
        and (placed["level"] != "rack" or {rack_of[n] for n in nodes} == {placed["domain"]}),
        "onLostNode": bool(set(nodes) & set(lost)),
    }


def utilisation(b: Bench, window: float, step: float = 0.25) -> dict[str, Any]:
    """Mean share of spares running a filler pod, sampled over `window` seconds, and how long
    after the window opened every spare first ran one (the ramp-up)."""
    samples: list[float] = []
    start = time.monotonic()
    end = start + window
    filled_after: float | None = None
    while time.monotonic() < end:
        nodes = {n.metadata.name for n in b.core.list_node().items if _ready(n)}
        pods = [
            p
            for p in b.core.list_pod_for_all_namespaces().items
            if p.spec.node_name in nodes and p.status.phase not in ("Succeeded", "Failed")
        ]
        ordinary = {
            p.spec.node_name for p in pods if (p.metadata.labels or {}).get(PREEMPTIBLE) != "true"
        }
        filled = {
            p.spec.node_name
            for p in pods
            if (p.metadata.labels or {}).get(PREEMPTIBLE) == "true" and p.status.phase == "Running"
        }
        spares = nodes - ordinary
        if spares:
            samples.append(len(spares & filled) / len(spares))
            if filled_after is None and spares <= filled:
                filled_after = round(time.monotonic() - start, 3)
        time.sleep(step)
    return {
        "samples": len(samples),
        "allFilledAfterSeconds": filled_after,
        "mean": round(statistics.mean(samples), 4) if samples else None,
        "min": round(min(samples), 4) if samples else None,
    }


def summarize(all_runs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r for r in all_runs if r["recovered"]]
    bound = [r["boundSeconds"] for r in runs] or [float("nan")]
    running = [r["runningSeconds"] for r in runs] or [float("nan")]
    return {
        "runs": len(all_runs),
        "recovered": len(runs),
        "boundSecondsMin": min(bound),
        "boundSecondsP50": round(statistics.median(bound), 3),
        "boundSecondsP99": percentile(bound, 0.99),
        "runningSecondsP50": round(statistics.median(running), 3),
        "runningSecondsP99": percentile(running, 0.99),
        "withinTwoSeconds": sum(b <= 2.0 for b in bound),
        "stayedInDomain": sum(r["stayedInDomain"] for r in runs),
        "oneRestart": sum(r["restarts"] == 1 and r["generations"] == 1 for r in runs),
        "onLostNode": sum(r["onLostNode"] for r in runs),
        "runsDetail": all_runs,
    }


def rack_scenario(b: Bench, runs: int, rack_of: dict[str, str]) -> dict[str, Any]:
    """A fresh gang and filler per run, each in a rack of its own: a node a gang lost stays in
    its status.avoidedNodes, so one rack of 4 could not hold a 3-node gang twice."""
    ns = b.namespace(f"bench-spares-rack-{os.getpid()}")
    racks = sorted(set(rack_of.values()))
    results = []
    for index in range(runs):
        rack = racks[index % len(racks)]
        pinned = {"spec": {"nodeSelector": {RACK_LABEL: rack}}}
        train, filler = f"train-{index}", f"filler-{index}"
        b.create(ns, manifest(
            train, 3, topology={"required": "rack"}, podTemplate=dict(pinned),
            failurePolicy={"nodeLostGraceSeconds": 0},
        ))  # fmt: skip
        b.wait_running(ns, train, 3)
        b.create(ns, manifest(filler, 1, runPolicy={"preemptible": True}, podTemplate=dict(pinned)))
        on_spare = b.wait_running(ns, filler, 1)["placement"]["nodes"]
        preemptions = preempted_so_far()
        run = recovery_run(b, ns, train, 3, 1, rack_of)
        after = b.status(ns, filler)
        run.setdefault("stayedInDomain", False)
        run.update(
            rack=rack,
            fillerOnSpare=on_spare,
            fillerPreempted=preempted_so_far() - preemptions,
            fillerRestarts=int(after.get("restarts") or 0),
            fillerRequeued=int(after.get("gangGeneration") or 1) == 2,
        )
        b.set_ready(run["lostNodes"], True)
        until(lambda run=run: b.ready(run["lostNodes"]), 60, 0.2)
        b.delete(ns, train)
        b.delete(ns, filler)
        results.append(run)
    b.core.delete_namespace(ns)
    summary = summarize(results)
    summary.update(
        fillerPreemptions=sum(r["fillerPreempted"] for r in results),
        fillerRestarts=sum(r["fillerRestarts"] for r in results),
        fillersRequeued=sum(r["fillerRequeued"] for r in results),
    )
    return summary


def preempted_so_far() -> float:
    from phalanx import metrics

    value = metrics.REGISTRY.get_sample_value(
        "phalanx_spare_preemptions_total", {"kind": "LLMTrainJob"}
    )
    return value or 0.0


def eight_scenario(b: Bench, runs: int, window: float, rack_of: dict[str, str]) -> dict[str, Any]:
    """Eight fillers stay for every run; each run a fresh 64-node gang (the nodes it lost stay
    in its status.avoidedNodes), on the 64 nodes that are not spares."""
    preemptions = preempted_so_far()
    ns = b.namespace(f"bench-spares-eight-{os.getpid()}")
    for i in range(8):
        b.create(ns, manifest(f"filler-{i}", 1, runPolicy={"preemptible": True}))
    results, windows = [], []
    for index in range(runs):
        for i in range(8):
            b.wait_running(ns, f"filler-{i}", 1)
        big = f"big-{index}"
        b.create(ns, manifest(big, 64, failurePolicy={"nodeLostGraceSeconds": 0}))
        b.wait_running(ns, big, 64, timeout=300)
        run = recovery_run(b, ns, big, 64, 8, rack_of)
        b.set_ready(run["lostNodes"], True)
        until(lambda run=run: b.ready(run["lostNodes"]), 60, 0.05)
        # The returned nodes are the spares now; the preempted fillers wait in the queue.
        windows.append(utilisation(b, window))
        b.delete(ns, big)
        results.append(run)
    fillers = [b.status(ns, f"filler-{i}") for i in range(8)]
    b.core.delete_namespace(ns)
    summary = summarize(results)
    means = [w["mean"] for w in windows if w["mean"] is not None]
    summary["fillerRestarts"] = sum(int(f.get("restarts") or 0) for f in fillers)
    summary["fillerPreemptions"] = preempted_so_far() - preemptions
    ramps = [w["allFilledAfterSeconds"] for w in windows if w["allFilledAfterSeconds"] is not None]
    summary["utilisation"] = {
        "windowSeconds": window,
        "meanOfRuns": round(statistics.mean(means), 4) if means else None,
        "minOfRuns": min(means) if means else None,
        "allFilledAfterSecondsP50": round(statistics.median(ramps), 3) if ramps else None,
        "allFilledAfterSecondsMax": max(ramps) if ramps else None,
        "neverAllFilled": len(windows) - len(ramps),
        "runsDetail": windows,
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--nodes", type=int, default=72)
    parser.add_argument("--output", type=Path, help="results file (default bench/results/...)")
    parser.add_argument(
        "--scenarios", default="rack,eight", help="which to run: rack, eight or both (a,b)"
    )
    args = parser.parse_args()

    from kopf.testing import KopfRunner

    from phalanx.devcluster import netns
    from phalanx.devcluster.build import require_binaries
    from phalanx.devcluster.cluster import DevCluster

    require_binaries(real_nodes=False)
    os.environ["PHALANX_PROGRESS_INTERVAL"] = "0"
    os.environ["PHALANX_METRICS_PORT"] = "0"
    os.environ.setdefault("PHALANX_LOG_LEVEL", "WARNING")
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    rack: dict[str, Any] | None = None
    eight: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-spares-") as root:
        cluster = DevCluster(Path(root))
        try:
            kubeconfig = cluster.up(profile="gpu", nodes=args.nodes)
            os.environ["KUBECONFIG"] = str(kubeconfig)
            crds = Path(__file__).resolve().parents[1] / "crds"
            kubectl = [str(require_binaries() / "kubectl"), f"--kubeconfig={kubeconfig}"]
            subprocess.run([*kubectl, "apply", "--server-side", "-f", str(crds)], check=True)
            # A CRD created a moment ago may have no status yet: `kubectl wait` then errors.
            established = until(
                lambda: (
                    subprocess.run(
                        [
                            *kubectl,
                            "wait",
                            "--for=condition=Established",
                            "--timeout=30s",
                            "crd",
                            "--all",
                        ],
                        check=False,
                    ).returncode
                    == 0
                ),
                90,
                1.0,
            )
            assert established, "CRDs not Established"
            b = Bench(kubeconfig)
            rack_of = {
                n.metadata.name: (n.metadata.labels or {}).get(RACK_LABEL, "")
                for n in b.core.list_node().items
            }
            argv = ["run", "--standalone", "--all-namespaces", "-m", "phalanx.handlers"]
            scenarios = set(args.scenarios.split(","))
            with netns.entered(cluster.namespace()):
                if "rack" in scenarios:
                    os.environ["PHALANX_SPARES"] = "rack=1"
                    with KopfRunner(argv, timeout=60):
                        rack = rack_scenario(b, args.runs, rack_of)
                    partial = {"nodeNotReadySpareInRack": rack}
                    (RESULTS / "spares.partial.json").write_text(json.dumps(partial, indent=2))
                if "eight" in scenarios:
                    os.environ["PHALANX_SPARES"] = "cluster=8"
                    with KopfRunner(argv, timeout=60):
                        eight = eight_scenario(b, args.runs, args.window, rack_of)
        finally:
            cluster.down()
    summary: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "load1AtStart": load_at_start,
            "load1": os.getloadavg()[0],
        },
        "cluster": {"kwokNodes": args.nodes, "racksOf": 4},
        "wallSeconds": round(time.monotonic() - started, 1),
    }
    if rack is not None:
        summary["nodeNotReadySpareInRack"] = {"policy": "rack=1", "gangNodes": 3, **rack}
    if eight is not None:
        summary["eightLostFrom64WithEightSpares"] = {
            "policy": "cluster=8",
            "gangNodes": 64,
            **eight,
        }
    RESULTS.mkdir(exist_ok=True)
    (args.output or RESULTS / "spares.json").write_text(json.dumps(summary, indent=2) + "\n")

    def short(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: short(v) for k, v in value.items() if k != "runsDetail"}
        return value

    json.dump(short(summary), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
