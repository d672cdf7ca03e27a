"""Hang and straggler detection on the local control plane, and straggler false positives.

On a fake cluster (`phalanx dev up`, gpu profile: 64 kwok nodes) with the operator running in
this process, every rank's /progress is served by a stand-in HTTP server on its fake pod's
address (inside the cluster's network namespace), polled every second
(PHALANX_PROGRESS_INTERVAL=1):

1. hang: a 2-node job with hangTimeoutSeconds T trains, then every rank stops at one step and
   rank 1 stops answering; measured: seconds from the stop until the gang's restart with
   reason Hang is in status (target: within T + 5 s), and whether the silent rank is named;
2. straggler: an 8-rank job where one rank's own work per step (ownStepSeconds) is 2x the
   others' while every rank's wall time is alike (they wait for it), windowSeconds W;
   measured: seconds until the Straggling condition names that rank's node (target: within
   3 windows);
3. false positives (pure, plan/gang_progress + plan/straggler): 30 minutes of a healthy 8-rank
   gang polled every 10 s with natural jitter in every rank's own step time.

Results go to bench/results/goodput.json. Usage:
    python bench/goodput.py [--runs 10] [--hang-timeout 10] [--window 10]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


class Rank:
    """A rank's /progress: the step moves every 0.2 s until frozen; `stop` ends it. It reports
    as the trainer does in a synchronous gang: its own work per step (`own_seconds`) and the
    wall time per step, the slowest rank's (`wall_seconds`, default its own)."""

    def __init__(
        self,
        rank: int,
        address: str,
        port: int,
        own_seconds: float,
        wall_seconds: float | None = None,
    ) -> None:
        self.rank, self.started = rank, time.monotonic()
        self.own_seconds = own_seconds
        self.wall_seconds = own_seconds if wall_seconds is None else wall_seconds
        self.frozen: int | None = None
        me = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(
                    {"step": me.step(), "totalSteps": 10**6, "stepSeconds": me.wall_seconds,
                     "ownStepSeconds": me.own_seconds, "lastCheckpointStep": 0, "rank": me.rank}
                ).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((address, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def step(self) -> int:
        if self.frozen is not None:
            return self.frozen
        return int((time.monotonic() - self.started) / 0.2)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def until(predicate: Any, timeout: float, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(step)
    return None


def job(name: str, nodes: int, port: int, policy: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "LLMTrainJob",
        "metadata": {"name": name},
        "spec": {
            "nodes": nodes,
            "processesPerNode": 1,
            "accelerator": {"type": "nvidia", "perNode": 8},
            "checkpoint": {"enabled": False},
            "trainer": {"metricsPort": port},
            "failurePolicy": policy,
            "podTemplate": {
                "metadata": {
                    "annotations": {
                        "phalanx.dev/fake-outcome": "Succeeded",
                        "phalanx.dev/fake-duration": "3600s",
                    }
                }
            },
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
        until(lambda: self.core.list_namespaced_service_account(name).items, 30)
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

    def running_pods(self, namespace: str, name: str, count: int) -> list[Any]:
        def ready() -> list[Any] | None:
            pods = self.core.list_namespaced_pod(
                namespace, label_selector=f"phalanx.dev/job={name}"
            )
            items = [p for p in pods.items if p.status.pod_ip and p.status.phase == "Running"]
            return items if len(items) == count else None

        found = until(ready, 120)
        assert found, f"{namespace}/{name}: pods not running"
        return sorted(found, key=lambda p: int(p.metadata.labels["phalanx.dev/rank"]))

    def condition(self, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
        for c in self.status(namespace, name).get("conditions") or []:
            if c["type"] == kind:
                return dict(c)
        return None


def hang_run(b: Bench, index: int, timeout: int) -> dict[str, Any]:
    ns = b.namespace(f"bench-hang-{index}-{os.getpid()}")
    port = free_port()
    b.create(ns, job("hung", 2, port, {"hangTimeoutSeconds": timeout}))
    pods = b.running_pods(ns, "hung", 2)
    ranks = [Rank(i, p.status.pod_ip, port, 0.2) for i, p in enumerate(pods)]
    try:
        trains = until(
            lambda: (b.status(ns, "hung").get("goodput") or {}).get("state") == "Training", 60
        )
        assert trains, "never training"
        step = max(r.step() for r in ranks)
        for r in ranks:
            r.frozen = step
        ranks[1].stop()
        stopped = time.monotonic()
        restarted = until(lambda: int(b.status(ns, "hung").get("restarts") or 0) >= 1, timeout + 60)
        seconds = time.monotonic() - stopped
        cond = b.condition(ns, "hung", "Restarting") or {}
        message = str(cond.get("message") or "")
        return {
            "detected": bool(restarted),
            "seconds": round(seconds, 2),
            "reason": cond.get("reason"),
            "namedSilentRank": "silent ranks 1 (pod hung-1" in message,
            "namedStep": f"stayed at {step} " in message,
        }
    finally:
        ranks[0].stop()
        b.core.delete_namespace(ns)


def straggler_run(b: Bench, index: int, window: int) -> dict[str, Any]:
    ns = b.namespace(f"bench-straggler-{index}-{os.getpid()}")
    port = free_port()
    b.create(ns, job("slow", 8, port, {"stragglers": {"windowSeconds": window}}))
    pods = b.running_pods(ns, "slow", 8)
    slow = index % 8
    # Every rank waits for the slow one: all walls are 2 s, only its own work is.
    ranks = [
        Rank(i, p.status.pod_ip, port, 2.0 if i == slow else 1.0, wall_seconds=2.0)
        for i, p in enumerate(pods)
    ]
    started = time.monotonic()
    try:
        node = pods[slow].spec.node_name
        named = until(
            lambda: (
                (c := b.condition(ns, "slow", "Straggling"))
                and c["status"] == "True"
                and f"rank {slow} (pod slow-{slow} on node {node})" in c["message"]
            ),
            6 * window,
        )
        seconds = time.monotonic() - started
        cond = b.condition(ns, "slow", "Straggling") or {}
        others = [s for s in b.status(ns, "slow").get("stragglers") or [] if s["rank"] != slow]
        return {
            "named": bool(named),
            "seconds": round(seconds, 2),
            "windows": round(seconds / window, 2),
            "falsePositives": len(others),
            "reason": cond.get("reason"),
        }
    finally:
        for r in ranks:
            r.stop()
        b.core.delete_namespace(ns)


def recovery_run(b: Bench, index: int, kind: str, grace: int) -> dict[str, Any]:
    """Time to recover: rank 1 fails (`crash`: its container exits 1; `node`: its node turns
    NotReady) -> the new gang's step moves again, as seen here and by the operator."""
    ns = b.namespace(f"bench-recover-{kind}-{grace}-{index}-{os.getpid()}")
    port = free_port()
    policy = {"nodeLostGraceSeconds": grace, "maxRestarts": 5}
    b.create(ns, job("rec", 2, port, policy))
    pods = b.running_pods(ns, "rec", 2)
    ranks = [Rank(i, p.status.pod_ip, port, 0.2) for i, p in enumerate(pods)]
    node = pods[1].spec.node_name
    try:
        trains = until(
            lambda: (b.status(ns, "rec").get("goodput") or {}).get("state") == "Training", 60
        )
        assert trains, "never training"
        failed = time.monotonic()
        if kind == "crash":
            annotations = {
                "phalanx.dev/fake-outcome": "Failed",
                "phalanx.dev/fake-exit-code": "1",
                "phalanx.dev/fake-duration": "0s",
            }
            b.core.patch_namespaced_pod("rec-1", ns, {"metadata": {"annotations": annotations}})
        else:
            annotations = {"phalanx.dev/fake-node-ready": "false"}
            b.core.patch_node(node, {"metadata": {"annotations": annotations}})
        for r in ranks:
            r.stop()
        ranks = []

        def new_gang() -> list[Any] | None:
            listed = b.core.list_namespaced_pod(ns, label_selector="phalanx.dev/job=rec").items
            fresh = [
                p
                for p in listed
                if p.metadata.labels.get("phalanx.dev/generation") == "2"
                and p.status.phase == "Running"
                and p.status.pod_ip
            ]
            return fresh if len(fresh) == 2 else None

        fresh = until(new_gang, grace + 120, step=0.1)
        assert fresh, "no new gang"
        placed = time.monotonic() - failed
        for p in fresh:
            ranks.append(
                Rank(int(p.metadata.labels["phalanx.dev/rank"]), p.status.pod_ip, port, 0.2)
            )
        recovered = until(
            lambda: (
                (g := b.status(ns, "rec").get("goodput") or {}).get("recoveries") == 1
                and g.get("state") == "Training"
                and g
            ),
            60,
            step=0.1,
        )
        seconds = time.monotonic() - failed
        return {
            "kind": kind,
            "graceSeconds": grace,
            "recovered": bool(recovered),
            "seconds": round(seconds, 2),
            "newGangRunningSeconds": round(placed, 2),
            "operatorLastRecoverySeconds": (recovered or {}).get("lastRecoverySeconds"),
        }
    finally:
        for r in ranks:
            r.stop()
        if kind == "node":
            b.core.patch_node(
                node, {"metadata": {"annotations": {"phalanx.dev/fake-node-ready": "true"}}}
            )
        b.core.delete_namespace(ns)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r["seconds"] for r in runs if r["recovered"]]
    ops = [r["operatorLastRecoverySeconds"] for r in runs if r["operatorLastRecoverySeconds"]]
    return {
        "runs": len(runs),
        "recovered": len(done),
        "secondsMin": min(done, default=None),
        "secondsP50": statistics.median(done) if done else None,
        "secondsP99": percentile(done, 0.99) if done else None,
        "operatorSecondsP50": statistics.median(ops) if ops else None,
        "newGangRunningP50": statistics.median([r["newGangRunningSeconds"] for r in runs])
        if runs
        else None,
        "runsDetail": runs,
    }


def false_positives(minutes: float, jitter: float, seed: int) -> dict[str, Any]:
    """A healthy 8-rank gang polled every 10 s for `minutes`: each rank's reported step time
    is 1 s x a log-normal jitter of `jitter` (per logging interval), plus rare one-poll
    spikes of 1.4x (a GC pause, a slow data batch)."""
    from phalanx.plan.gang_progress import RankAnswer, observe_gang
    from phalanx.plan.straggler import find_stragglers

    rng = random.Random(seed)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    gang = None
    flagged: set[int] = set()
    polls = int(minutes * 6)
    for i in range(polls):
        now = t0 + timedelta(seconds=10 * i)
        own = [
            rng.lognormvariate(0, jitter) * (1.4 if rng.random() < 0.01 else 1.0) for _ in range(8)
        ]
        # Synchronous: every rank's wall time is the slowest rank's work.
        answers = [
            RankAnswer(
                rank,
                f"p{rank}",
                f"n{rank}",
                {"step": i * 10, "stepSeconds": max(own), "ownStepSeconds": seconds},
            )
            for rank, seconds in enumerate(own)
        ]
        gang = observe_gang(gang, 1, answers, now, 1.5)
        found, _ = find_stragglers(gang, 300, now)
        flagged |= {s.rank for s in found}
    return {"minutes": minutes, "jitter": jitter, "polls": polls, "flaggedRanks": sorted(flagged)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--hang-timeout", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--recovery-runs", type=int, default=10)
    parser.add_argument("--only", choices=["all", "recovery"], default="all")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/...)")
    args = parser.parse_args()

    from kopf.testing import KopfRunner

    from phalanx.devcluster import netns
    from phalanx.devcluster.build import require_binaries
    from phalanx.devcluster.cluster import DevCluster

    require_binaries(real_nodes=False)
    os.environ["PHALANX_PROGRESS_INTERVAL"] = "1"
    os.environ["PHALANX_METRICS_PORT"] = "0"
    os.environ.setdefault("PHALANX_LOG_LEVEL", "WARNING")
    healthy = [false_positives(30, j, seed) for j in (0.05, 0.1, 0.2) for seed in (1, 2, 3)]
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-goodput-") as root:
        cluster = DevCluster(Path(root))
        try:
            kubeconfig = cluster.up(profile="gpu")
            os.environ["KUBECONFIG"] = str(kubeconfig)
            crds = Path(__file__).resolve().parents[1] / "crds"
            kubectl = [str(require_binaries() / "kubectl"), f"--kubeconfig={kubeconfig}"]
            subprocess.run([*kubectl, "apply", "--server-side", "-f", str(crds)], check=True)
            subprocess.run(
                [*kubectl, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"],
                check=True,
            )
            b = Bench(kubeconfig)
            args_ = ["run", "--standalone", "--all-namespaces", "-m", "phalanx.handlers"]
            # Inside the cluster's network namespace, where the fake pods' addresses are: the
            # operator dials them, the stand-ins serve on them.
            with netns.entered(cluster.namespace()), KopfRunner(args_, timeout=60):
                n = args.recovery_runs
                recovery = {
                    "rankCrash": summarize([recovery_run(b, i, "crash", 30) for i in range(n)]),
                    "nodeNotReadyGrace0": summarize(
                        [recovery_run(b, i, "node", 0) for i in range(n)]
                    ),
                    "nodeNotReadyGrace30": summarize(
                        [recovery_run(b, i, "node", 30) for i in range(n)]
                    ),
                }
                runs = 0 if args.only == "recovery" else args.runs
                hangs = [hang_run(b, i, args.hang_timeout) for i in range(runs)]
                stragglers = [straggler_run(b, i, args.window) for i in range(runs)]
        finally:
            cluster.down()
    hang_seconds = [h["seconds"] for h in hangs if h["detected"]]
    straggler_windows = [s["windows"] for s in stragglers if s["named"]]
    summary = {
        "machine": {"cpus": os.cpu_count(), "load1": os.getloadavg()[0]},
        "hang": {
            "timeoutSeconds": args.hang_timeout,
            "runs": len(hangs),
            "detected": sum(h["detected"] for h in hangs),
            "withinTimeoutPlus5s": sum(h["seconds"] <= args.hang_timeout + 5 for h in hangs),
            "silentRankNamed": sum(h["namedSilentRank"] for h in hangs),
            "secondsMin": min(hang_seconds, default=None),
            "secondsP50": statistics.median(hang_seconds) if hang_seconds else None,
            "secondsP99": percentile(hang_seconds, 0.99) if hang_seconds else None,
            "runsDetail": hangs,
        },
        "straggler": {
            "windowSeconds": args.window,
            "slowdown": 2.0,
            "runs": len(stragglers),
            "named": sum(s["named"] for s in stragglers),
            "withinThreeWindows": sum(s["named"] and s["windows"] <= 3 for s in stragglers),
            "falsePositives": sum(s["falsePositives"] for s in stragglers),
            "windowsMin": min(straggler_windows, default=None),
            "windowsP50": statistics.median(straggler_windows) if straggler_windows else None,
            "windowsP99": percentile(straggler_windows, 0.99) if straggler_windows else None,
            "runsDetail": stragglers,
        },
        "healthyGangFalsePositives": healthy,
        "timeToRecover": recovery,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "goodput.json" if args.only == "all" else f"goodput_{args.only}.json"
    if args.only == "recovery":
        summary = {"machine": summary["machine"], "timeToRecover": recovery}
    (args.output or RESULTS / name).write_text(json.dumps(summary, indent=2) + "\n")
    short = {k: {kk: vv for kk, vv in v.items() if kk != "runsDetail"} for k, v in summary.items()
             if isinstance(v, dict)}  # fmt: skip
    json.dump(short, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
