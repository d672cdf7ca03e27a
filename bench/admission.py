"""Gang admission at scale: the builtin admission loop against plain kube-scheduler (`none`).

On a fake cluster of N nodes x 8 GPUs (default 1,000 nodes, 8,000 GPUs) started with
`phalanx dev up`, with the operator running as its own process, both modes in the same run:

1. latency from `create` to all pods bound for one 64-pod gang (repeated, p50/p90);
2. a burst of mixed jobs (1..64 nodes): pods bound per second, the share of multi-node gangs
   that fit one rack and got one rack, gangs seen partially bound while their other pods were
   unschedulable, operator RSS, and API requests per job.

Results go to bench/results/admission.json and a printed summary. Usage:
    python bench/admission.py [--nodes 1000] [--jobs 300] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config

from phalanx.devcluster import netns
from phalanx.devcluster.build import require_binaries
from phalanx.devcluster.cluster import DevCluster

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SIZES = [1, 1, 2, 2, 4, 4, 8, 16, 32, 64]  # skewed towards small jobs, like real queues
RACK_HOSTS = 4


def job(name: str, nodes: int, mode: str, duration: str) -> dict[str, Any]:
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "LLMTrainJob",
        "metadata": {"name": name},
        "spec": {
            "nodes": nodes,
            "accelerator": {"type": "nvidia", "perNode": 8},
            "checkpoint": {"enabled": False},
            "runPolicy": {"gangScheduler": mode},
            "failurePolicy": {"gangTimeoutSeconds": 3600},
            "podTemplate": {
                "metadata": {
                    "annotations": {
                        "phalanx.dev/fake-outcome": "Succeeded",
                        "phalanx.dev/fake-duration": duration,
                    }
                }
            },
        },
    }


class Cluster:
    def __init__(self, kubeconfig: Path) -> None:
        config.load_kube_config(str(kubeconfig))
        self.core = client.CoreV1Api()
        self.custom = client.CustomObjectsApi()
        self.racks = {
            n.metadata.name: (n.metadata.labels or {}).get("phalanx.dev/rack", "")
            for n in self.core.list_node().items
        }

    def namespace(self, name: str) -> str:
        self.core.create_namespace({"metadata": {"name": name}})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.core.list_namespaced_service_account(name).items:
                return name
            time.sleep(0.2)
        raise RuntimeError(f"no default ServiceAccount in {name}")

    def create(self, namespace: str, obj: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs", obj
        )

    def delete_all(self, namespace: str) -> None:
        self.custom.delete_collection_namespaced_custom_object(
            "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs"
        )
        deadline = time.monotonic() + 300
        while (
            time.monotonic() < deadline and self.core.list_namespaced_pod(namespace, limit=1).items
        ):
            time.sleep(0.5)

    def pods(self, namespace: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(namespace).items)

    def job_phases(self, namespace: str) -> dict[str, str]:
        items = self.custom.list_namespaced_custom_object(
            "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs"
        )["items"]
        return {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "") for i in items}


def unschedulable(pod: Any) -> bool:
    return any(
        c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
        for c in pod.status.conditions or []
    )


def single_gang(cluster: Cluster, namespace: str, mode: str, reps: int) -> list[float]:
    latencies = []
    for rep in range(reps):
        name = f"solo-{mode}-{rep}"
        started = time.monotonic()
        cluster.create(namespace, job(name, 64, mode, "600s"))
        while True:
            pods = [
                p
                for p in cluster.pods(namespace)
                if p.metadata.labels.get("phalanx.dev/job") == name
            ]
            if len(pods) == 64 and all(p.spec.node_name for p in pods):
                break
            if time.monotonic() - started > 120:
                raise RuntimeError(f"{mode}: 64-pod gang not bound in 120 s")
            time.sleep(0.05)
        latencies.append(time.monotonic() - started)
        cluster.delete_all(namespace)
    return latencies


def burst(cluster: Cluster, namespace: str, mode: str, count: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    sizes = {f"b{i:03d}": rng.choice(SIZES) for i in range(count)}
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(
            pool.map(
                lambda item: cluster.create(namespace, job(item[0], item[1], mode, "5s")),
                sizes.items(),
            )
        )
    created = time.monotonic() - started
    bound_at: dict[str, float] = {}
    nodes_of: dict[str, dict[str, str]] = {name: {} for name in sizes}
    partial: set[str] = set()
    deadline = started + 900
    while time.monotonic() < deadline:
        by_job: dict[str, list[Any]] = {}
        for pod in cluster.pods(namespace):
            owner = pod.metadata.labels.get("phalanx.dev/job", "")
            by_job.setdefault(owner, []).append(pod)
            if pod.spec.node_name:
                bound_at.setdefault(
                    pod.metadata.name + "/" + pod.metadata.labels.get("phalanx.dev/generation", ""),
                    time.monotonic(),
                )
                nodes_of[owner][pod.metadata.name] = pod.spec.node_name
        for owner, pods in by_job.items():
            live = [p for p in pods if p.status.phase in ("Pending", "Running")]
            bound = [p for p in live if p.spec.node_name]
            if bound and any(unschedulable(p) for p in live if not p.spec.node_name):
                partial.add(owner)
        phases = cluster.job_phases(namespace)
        if len(phases) == count and all(p in ("Succeeded", "Failed") for p in phases.values()):
            break
        time.sleep(1.0)  # listing thousands of pods is itself load on the API server
    elapsed = max(bound_at.values()) - started if bound_at else float("nan")
    rack_fit = [n for n, size in sizes.items() if 1 < size <= RACK_HOSTS]
    one_rack = [
        n for n in rack_fit if len({cluster.racks.get(node) for node in nodes_of[n].values()}) == 1
    ]
    phases = cluster.job_phases(namespace)
    return {
        "jobs": count,
        "pods": sum(sizes.values()),
        "create_seconds": round(created, 2),
        "bind_span_seconds": round(elapsed, 2),
        "pods_bound_per_second": round(len(bound_at) / elapsed, 1) if bound_at else 0,
        "rack_fitting_gangs": len(rack_fit),
        "rack_fitting_gangs_in_one_rack": len(one_rack),
        "share_in_one_rack": round(len(one_rack) / len(rack_fit), 3) if rack_fit else None,
        "gangs_seen_partially_bound": len(partial),
        "succeeded": sum(p == "Succeeded" for p in phases.values()),
    }


def scrape(port: int, namespace: str | None) -> dict[str, float]:
    """API requests the operator made: the total and per `verb resource`. The operator runs in
    the cluster's network namespace, so its metrics port is reached from there."""
    with netns.entered(namespace):
        response = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("phalanx_api_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            fields = dict(
                part.split("=", 1) for part in labels[labels.index("{") + 1 : -1].split(",")
            )
            kind = f"{fields['verb'].strip(chr(34))} {fields['resource'].strip(chr(34))}"
            totals[kind] = totals.get(kind, 0) + float(value)
            totals["api_requests"] = totals.get("api_requests", 0) + float(value)
    return totals


def rss_mib(pid: int) -> dict[str, float]:
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--modes", nargs="+", default=["builtin", "none"], choices=["builtin", "none"]
    )
    parser.add_argument("--output", default="admission.json", help="file name under bench/results")
    parser.add_argument(
        "--operator-path",
        help="run the operator from this source directory (e.g. an older commit's operator/) "
        "to compare API requests per job before and after a change",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="phalanx-bench-"))
    cluster_dir = DevCluster(workdir / "cluster")
    up_started = time.monotonic()
    kubeconfig = cluster_dir.up(profile="gpu", nodes=args.nodes, timeout=600)
    up_seconds = time.monotonic() - up_started
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PHALANX_METRICS_PORT": "18080"}
    subprocess.run(
        [sys.executable, "-m", "phalanx.cli", "crds", "--output", str(workdir / "crds")],
        check=True,
        env=env,
    )
    kubectl = require_binaries() / "kubectl"
    subprocess.run(
        [
            str(kubectl),
            f"--kubeconfig={kubeconfig}",
            "apply",
            "--server-side",
            "-f",
            str(workdir / "crds"),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            str(kubectl),
            f"--kubeconfig={kubeconfig}",
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
        check=True,
        capture_output=True,
    )
    operator_env = dict(env)
    if args.operator_path:
        operator_env["PYTHONPATH"] = os.pathsep.join(
            [args.operator_path, *filter(None, [os.environ.get("PYTHONPATH")])]
        )
    log = (workdir / "operator.log").open("w")
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "phalanx.cli",
            "operator",
            "run",
            "--metrics-port",
            "18080",
            "--liveness",
            "http://127.0.0.1:18081/healthz",
        ],
        env=operator_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Inside the cluster's network namespace, where the fake pods' addresses are.
        preexec_fn=netns.enter(cluster_dir.namespace()),
    )
    results: dict[str, Any] = {
        "operator_path": args.operator_path or "installed",
        "nodes": args.nodes,
        "gpus": args.nodes * 8,
        "dev_up_seconds": round(up_seconds, 1),
        "modes": {},
    }
    try:
        time.sleep(5)
        cluster = Cluster(kubeconfig)
        for mode in args.modes:
            before_all = scrape(18080, cluster_dir.namespace())
            before = before_all.get("api_requests", 0)
            namespace = cluster.namespace(f"bench-{mode}")
            latencies = single_gang(cluster, namespace, mode, args.reps)
            outcome = burst(cluster, namespace, mode, args.jobs, args.seed)
            after_all = scrape(18080, cluster_dir.namespace())
            after = after_all.get("api_requests", 0)
            jobs = args.jobs + args.reps
            outcome["api_requests_per_job"] = round((after - before) / jobs, 1)
            outcome["api_requests_per_job_by_kind"] = {
                kind: round((count - before_all.get(kind, 0)) / jobs, 2)
                for kind, count in sorted(after_all.items())
                if kind != "api_requests" and count - before_all.get(kind, 0) > 0
            }
            results["modes"][mode] = {
                "gang64_bind_seconds": [round(x, 3) for x in latencies],
                "gang64_bind_p50": round(statistics.median(latencies), 3),
                "gang64_bind_max": round(max(latencies), 3),
                "burst": outcome,
                "operator_rss_mib": rss_mib(operator.pid),
            }
            cluster.delete_all(namespace)
            print(json.dumps({mode: results["modes"][mode]}, indent=2), flush=True)
        if {"builtin", "none"} <= set(results["modes"]):
            builtin = results["modes"]["builtin"]["burst"]
            none = results["modes"]["none"]["burst"]
            results["bind_rate_ratio_builtin_over_none"] = round(
                builtin["pods_bound_per_second"] / none["pods_bound_per_second"], 3
            )
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        cluster_dir.down()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
