"""Gang admission at scale: Phalanx's builtin admission, kube-scheduler alone, Kueue TAS and
the API server's own ceiling, on one fake cluster per size, all in the same run.

Modes (each in its own namespace of the same cluster, one after another):
- builtin: `gangScheduler: builtin`, Phalanx places the gang and lifts its gate;
- none:    `gangScheduler: none`, kube-scheduler binds pod by pod (no gang);
- kueue:   `gangScheduler: kueue`, Kueue (built from the Go module proxy, topology-aware
           scheduling over the same levels) admits the pod group, kube-scheduler binds;
- ceiling: no scheduler at all, raw pod create + `pods/binding` from this process with
           bounded concurrency: what this machine's API server can do at best.

Figures per mode (see bench/README.md): apply -> all-bound latency of a 64-pod and a 512-pod
gang; bound pods/s on a burst capacity does not limit, and as a fraction of the ceiling; a
contended burst (more demand than capacity, mixed sizes and priorities): share of rack-fitting
gangs in one rack, idle GPUs while gangs wait, gangs ever partly bound (sampled every 100 ms),
jobs finished; queue depth: apply -> all-bound of a job that fits behind N pending ones that
do not; the operator's RSS, CPU seconds per minute, API requests per job, and cold restart to
its first correct admission. Pod state comes from watches, so sampling costs no API calls.

    python bench/scale.py --nodes 1000 [--modes builtin none kueue ceiling] [--reps 5]
Results: bench/results/scale.json (one entry per size, merged into what is there).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from admission import job, rss_mib, scrape
from phalanx.devcluster.cluster import OPERATOR, DevCluster
from phalanx.devcluster.processes import read_pid_file, stop_process
from phalanx.placement import Topology

RESULTS = Path(__file__).resolve().parent / "results"
GPU = "nvidia.com/gpu"
GPUS_PER_NODE = 8
JOB_LABEL = "phalanx.dev/job"
CEILING_LABEL = "bench.phalanx.dev/ceiling"
METRICS_PORT = 18080
MODES = ("builtin", "none", "kueue", "ceiling")
CONTENDED_SIZES = [1, 1, 2, 2, 2, 3, 4, 4, 8, 16, 32, 64]  # nodes; skewed small, like real queues


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "p50": round(statistics.median(values), 3),
        "p99": round(percentile(values, 0.99), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "samples": [round(v, 3) for v in values],
    }


def trainjob(
    name: str,
    mode: str,
    nodes: int,
    *,
    gpus: int = GPUS_PER_NODE,
    duration: str = "3600s",
    priority: int = 0,
    rack: bool = False,
) -> dict[str, Any]:
    manifest = job(name, nodes, mode, duration)  # bench/admission.py's fake-outcome job
    spec: dict[str, Any] = manifest["spec"]
    spec["accelerator"]["perNode"] = gpus
    spec["runPolicy"]["priority"] = priority
    if mode == "kueue":
        spec["runPolicy"]["queueName"] = "phalanx"
    if rack and mode != "none":  # kube-scheduler alone has no topology to ask for
        spec["topology"] = {"preferred": "rack"}
    return manifest


@dataclass
class PodView:
    job: str
    node: str
    gpus: int
    unschedulable: bool
    done: bool


@dataclass
class Tracker:
    """Every pod of one namespace as its watch last reported it, and when each was bound."""

    core: client.CoreV1Api
    namespace: str
    selector: str
    pods: dict[str, PodView] = field(default_factory=dict)
    bound_at: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Tracker:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        version = ""
        while not self.stopped.is_set():
            try:
                if not version:
                    listed = self.core.list_namespaced_pod(
                        self.namespace, label_selector=self.selector
                    )
                    with self.lock:
                        self.pods = {}
                        for pod in listed.items:
                            self._record(pod)
                    version = listed.metadata.resource_version
                stream = watch.Watch().stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=version,
                    timeout_seconds=60,
                    allow_watch_bookmarks=True,
                )
                for event in stream:
                    pod = event["object"]
                    version = pod.metadata.resource_version
                    if event["type"] == "BOOKMARK":
                        continue
                    with self.lock:
                        if event["type"] == "DELETED":
                            self.pods.pop(pod.metadata.uid, None)
                        else:
                            self._record(pod)
                    if self.stopped.is_set():
                        return
            except client.ApiException as error:
                if error.status == 410:
                    version = ""  # expired: list again
                else:
                    time.sleep(0.5)
            except Exception:  # a dropped connection: resume from the last version
                time.sleep(0.2)

    def _record(self, pod: Any) -> None:
        labels = pod.metadata.labels or {}
        requests = (pod.spec.containers[0].resources.requests or {}) if pod.spec.containers else {}
        unschedulable = any(
            c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            for c in (pod.status.conditions or [])
        )
        view = PodView(
            labels.get(JOB_LABEL, labels.get(CEILING_LABEL, "")),
            pod.spec.node_name or "",
            int(requests.get(GPU, 0)),
            unschedulable,
            pod.status.phase in ("Succeeded", "Failed")
            or pod.metadata.deletion_timestamp is not None,
        )
        self.pods[pod.metadata.uid] = view
        if view.node:
            self.bound_at.setdefault(pod.metadata.uid, time.monotonic())

    def snapshot(self) -> list[PodView]:
        with self.lock:
            return list(self.pods.values())

    def by_job(self) -> dict[str, list[PodView]]:
        jobs: dict[str, list[PodView]] = {}
        for pod in self.snapshot():
            jobs.setdefault(pod.job, []).append(pod)
        return jobs

    def stop(self) -> None:
        self.stopped.set()


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Bench:
    def __init__(self, cluster: DevCluster, nodes: int, topology: Topology) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self.topology = topology
        config.load_kube_config(str(cluster.kubeconfig))
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = 32
        self.api = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.node_names = [n.metadata.name for n in self.core.list_node().items]
        self.requests = 0.0
        self.requests_at = 0.0
        rack_label = topology.label("rack")
        self.rack_of = {
            n.metadata.name: (n.metadata.labels or {}).get(rack_label, "")
            for n in self.core.list_node().items
        }

    # -- objects ---------------------------------------------------------------------------

    def namespace(self, name: str, mode: str) -> str:
        with contextlib.suppress(client.ApiException):
            self.core.create_namespace({"metadata": {"name": name}})
        wait_until(
            lambda: bool(self.core.list_namespaced_service_account(name).items),
            30,
            f"the default ServiceAccount of {name}",
            0.2,
        )
        if mode == "kueue":
            self.cluster.kueue_queue(name)
        return name

    def create(self, namespace: str, obj: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs", obj
        )

    def create_many(self, namespace: str, objs: list[dict[str, Any]], workers: int = 16) -> float:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda obj: self.create(namespace, obj), objs))
        return time.monotonic() - started

    def delete(self, namespace: str, name: str) -> None:
        with contextlib.suppress(client.ApiException):
            self.custom.delete_namespaced_custom_object(
                "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs", name
            )

    def clear(self, namespace: str, tracker: Tracker, timeout: float = 900) -> None:
        with contextlib.suppress(client.ApiException):  # a 504 leaves the deletion going on
            self.custom.delete_collection_namespaced_custom_object(
                "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs"
            )
        wait_until(lambda: not tracker.snapshot(), timeout, f"the pods of {namespace} gone", 0.5)

    def jobs_finished(self, namespace: str) -> int:
        items = self.custom.list_namespaced_custom_object(
            "phalanx.dev", "v1alpha1", namespace, "llmtrainjobs"
        )["items"]
        return sum((i.get("status") or {}).get("phase") == "Succeeded" for i in items)

    # -- figures ---------------------------------------------------------------------------

    def gang_latency(
        self, namespace: str, mode: str, tracker: Tracker, size: int, reps: int
    ) -> dict[str, Any]:
        latencies = []
        for rep in range(reps):
            name = f"solo{size}-{rep}"
            started = time.monotonic()
            self.create(namespace, trainjob(name, mode, size))

            def bound(name: str = name) -> bool:
                pods = tracker.by_job().get(name, [])
                return len(pods) == size and all(p.node for p in pods)

            wait_until(bound, 600, f"{mode}: the {size}-pod gang bound")
            latencies.append(time.monotonic() - started)
            self.delete(namespace, name)
            wait_until(lambda n=name: n not in tracker.by_job(), 600, f"{name} gone", 0.1)
        return summary(latencies)

    def free_burst(self, namespace: str, mode: str, tracker: Tracker, gangs: int) -> dict[str, Any]:
        """Gangs of 8..64 one-GPU pods that all fit at once: bind speed, not capacity."""
        sizes = burst_sizes(gangs, self.nodes * GPUS_PER_NODE)
        jobs = [trainjob(f"f{i:04d}", mode, s, gpus=1) for i, s in enumerate(sizes)]
        started = time.monotonic()
        created = self.create_many(namespace, jobs)
        total = sum(sizes)
        wait_until(
            lambda: sum(1 for p in tracker.snapshot() if p.node) >= total,
            1800,
            f"{mode}: {total} burst pods bound",
            0.2,
        )
        span = max(tracker.bound_at.values()) - started
        self.clear(namespace, tracker)
        return {
            "gangs": len(sizes),
            "pods": total,
            "create_seconds": round(created, 2),
            "bind_span_seconds": round(span, 2),
            "pods_bound_per_second": round(total / span, 1),
        }

    def ceiling(
        self, namespace: str, tracker: Tracker, pods: int, workers: int = 16
    ) -> dict[str, Any]:
        """Raw pod create + bind, no scheduler: the API server's rate for what a gang costs."""
        slots = [name for name in self.node_names for _ in range(GPUS_PER_NODE)]

        def one(index: int) -> None:
            name = f"c{index:05d}"
            body = {
                "metadata": {"name": name, "labels": {CEILING_LABEL: "burst"}},
                "spec": {
                    "schedulerName": "bench-ceiling",  # nobody's: this process binds
                    "containers": [
                        {
                            "name": "main",
                            "image": "fake",
                            "resources": {"requests": {GPU: "1"}, "limits": {GPU: "1"}},
                        }
                    ],
                },
            }
            self.core.create_namespaced_pod(namespace, body, _preload_content=False)
            binding = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": slots[index % len(slots)]},
            }
            self.core.create_namespaced_pod_binding(
                name, namespace, binding, _preload_content=False
            )

        count = min(pods, len(slots))
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(count)))
        wait_until(
            lambda: sum(1 for p in tracker.snapshot() if p.node) >= count, 600, "ceiling bound", 0.2
        )
        span = max(tracker.bound_at.values()) - started
        # A large collection can outlast the request's timeout (504); the deletion goes on.
        with contextlib.suppress(client.ApiException):
            self.core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
        wait_until(lambda: not tracker.snapshot(), 600, "ceiling pods gone", 0.5)
        return {
            "pods": count,
            "workers": workers,
            "bind_span_seconds": round(span, 2),
            "pods_bound_per_second": round(count / span, 1),
        }

    def contended(
        self, namespace: str, mode: str, tracker: Tracker, jobs: int, seed: int, window: float
    ) -> dict[str, Any]:
        """More demand than capacity, mixed sizes and priorities, jobs that run 10-30 s."""
        rng = random.Random(seed)
        sizes = {f"k{i:04d}": rng.choice(CONTENDED_SIZES) for i in range(jobs)}
        manifests = [
            trainjob(
                name,
                mode,
                size,
                duration=f"{rng.randint(10, 30)}s",
                priority=rng.choice([0, 0, 0, 100]),
                rack=True,
            )
            for name, size in sizes.items()
        ]
        capacity = self.nodes * GPUS_PER_NODE
        partial: set[str] = set()
        racks: dict[str, set[str]] = {name: set() for name in sizes}
        idle_while_waiting: list[float] = []
        fragmented = 0
        samples = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal fragmented, samples
            while not stop.is_set():
                by_job = tracker.by_job()
                used = 0
                waiting = []
                for name, size in sizes.items():
                    pods = [p for p in by_job.get(name, []) if not p.done]
                    bound = [p for p in pods if p.node]
                    used += sum(p.gpus for p in bound)
                    for pod in bound:
                        racks[name].add(self.rack_of.get(pod.node, ""))
                    if bound and any(p.unschedulable for p in pods if not p.node):
                        partial.add(name)
                    if pods and len(bound) < size:
                        waiting.append(size * GPUS_PER_NODE)
                if waiting:
                    free = capacity - used
                    samples += 1
                    idle_while_waiting.append(free / capacity)
                    if free >= min(waiting):
                        fragmented += 1
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        self.create_many(namespace, manifests)
        while time.monotonic() - started < window:
            if self.jobs_finished(namespace) == jobs:
                break
            time.sleep(2.0)
        stop.set()
        sampler.join()
        finished = self.jobs_finished(namespace)
        rack_fit = [n for n, size in sizes.items() if 1 < size <= self.rack_hosts()]
        one_rack = [n for n in rack_fit if len(racks[n]) == 1]
        self.clear(namespace, tracker)
        return {
            "jobs": jobs,
            "gpus_demanded": sum(sizes.values()) * GPUS_PER_NODE,
            "gpus": capacity,
            "window_seconds": window,
            "jobs_finished": finished,
            "rack_fitting_gangs": len(rack_fit),
            "rack_fitting_gangs_in_one_rack": len(one_rack),
            "share_in_one_rack": round(len(one_rack) / len(rack_fit), 3) if rack_fit else None,
            "gangs_ever_partly_bound": len(partial),
            "idle_gpu_share_while_waiting_mean": round(statistics.fmean(idle_while_waiting), 3)
            if idle_while_waiting
            else None,
            "samples_waiting": samples,
            "samples_idle_enough_for_a_waiting_gang": fragmented,
        }

    def queue_depth(
        self,
        namespace: str,
        mode: str,
        tracker: Tracker,
        pending: int,
        reps: int,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """A filler leaves 4 nodes free; `pending` 5-node jobs cannot fit; a 2-node job can."""
        free = 4
        self.create(namespace, trainjob("filler", mode, self.nodes - free))
        wait_until(
            lambda: (
                sum(1 for p in tracker.by_job().get("filler", []) if p.node) == self.nodes - free
            ),
            900,
            f"{mode}: the filler bound",
            0.2,
        )
        started_queue = time.monotonic()
        created = self.create_many(
            namespace, [trainjob(f"q{i:05d}", mode, free + 1) for i in range(pending)]
        )
        # Steady state first: every queued job's (gated) pods exist and the operator (and
        # Kueue) has seen the whole queue, so the figure is admission at depth, not creation.
        wait_until(
            lambda: (
                sum(len(v) for k, v in tracker.by_job().items() if k.startswith("q"))
                >= pending * (free + 1)
            ),
            1800,
            f"{mode}: the pods of {pending} pending jobs",
            0.5,
        )
        queued_at = time.monotonic()
        time.sleep(10)
        latencies: list[float] = []
        missed = 0
        for rep in range(reps):
            name = f"fits-{rep}"
            started = time.monotonic()
            self.create(namespace, trainjob(name, mode, 2))
            try:
                wait_until(
                    lambda n=name: len([p for p in tracker.by_job().get(n, []) if p.node]) == 2,
                    timeout,
                    f"{mode}: a fitting job behind {pending} pending bound",
                )
                latencies.append(time.monotonic() - started)
            except RuntimeError:
                missed += 1  # not admitted at all: the queue in front blocks it
            self.delete(namespace, name)
            wait_until(lambda n=name: n not in tracker.by_job(), 300, f"{name} gone", 0.1)
        footprint = self.footprint()
        self.clear(namespace, tracker)
        return {
            "pending": pending,
            "create_seconds": round(created, 1),
            "queue_pods_created_seconds": round(queued_at - started_queue, 1),
            "admission": summary(latencies) if latencies else None,
            "not_bound_within_seconds": timeout,
            "not_bound": missed,
            "operator_with_queue": footprint,
        }

    def rack_hosts(self) -> int:
        counts: dict[str, int] = {}
        for rack in self.rack_of.values():
            counts[rack] = counts.get(rack, 0) + 1
        return min(counts.values())

    # -- the operator ---------------------------------------------------------------------

    def operator_pid(self) -> int:
        record = read_pid_file(self.cluster.layout.pid_file(OPERATOR))
        if record is None:
            raise RuntimeError("the operator is not running")
        return record.pid

    def footprint(self, seconds: float = 60.0) -> dict[str, Any]:
        pid = self.operator_pid()
        before = cpu_seconds(pid)
        time.sleep(seconds)
        after = cpu_seconds(pid)
        return {
            **rss_mib(pid),
            "cpu_seconds_per_minute_steady": round((after - before) * 60 / seconds, 2),
            "pods_in_cluster": self.pod_count(),
        }

    def pod_count(self) -> int:
        count, token = 0, None
        while True:
            page = self.core.list_pod_for_all_namespaces(limit=5000, _continue=token)
            count += len(page.items)
            token = page.metadata._continue
            if not token:
                return count

    def cold_restart(self, namespace: str, mode: str, tracker: Tracker) -> float:
        """SIGKILL the operator, start it again and time its first correct admission."""
        self.count_requests()  # the counters start again from zero with the new process
        self.requests_at = 0.0
        os.kill(self.operator_pid(), signal.SIGKILL)
        stop_process(self.cluster.layout.pid_file(OPERATOR))
        started = time.monotonic()
        self.cluster.start_operator(operator_env())
        self.create(namespace, trainjob("after-restart", mode, 2))
        wait_until(
            lambda: len([p for p in tracker.by_job().get("after-restart", []) if p.node]) == 2,
            600,
            f"{mode}: first admission after the operator restarted",
        )
        return round(time.monotonic() - started, 2)

    def count_requests(self) -> float:
        """API requests the operator made since the last call, summed in `self.requests`
        (across its restarts: a new process counts from zero)."""
        total = scrape(METRICS_PORT, self.cluster.namespace()).get("api_requests", 0.0)
        delta = total - self.requests_at
        self.requests += delta
        self.requests_at = total
        return delta


def burst_sizes(gangs: int, slots: int) -> list[int]:
    """`gangs` gang sizes of 8..64 pods cycling through a fixed mix, as many as fit 90% of
    `slots` one-GPU pods (fewer gangs on a cluster too small for the whole mix)."""
    mix = [8, 8, 16, 8, 32, 8, 16, 8, 16, 64]
    sizes: list[int] = []
    for index in range(gangs):
        size = mix[index % len(mix)]
        if sum(sizes) + size > 0.9 * slots:
            break
        sizes.append(size)
    return sizes


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def operator_env() -> dict[str, str]:
    return {"PHALANX_TOPOLOGY": "generic", "PHALANX_METRICS_PORT": str(METRICS_PORT)}


@contextlib.contextmanager
def tracked(bench: Bench, namespace: str, selector: str) -> Iterator[Tracker]:
    tracker = Tracker(bench.core, namespace, selector).start()
    try:
        yield tracker
    finally:
        tracker.stop()


def run_size(
    args: argparse.Namespace, checkpoint: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="phalanx-scale-"))
    cluster = DevCluster(workdir / "cluster")
    up_started = time.monotonic()
    cluster.up(profile="gpu", nodes=args.nodes, timeout=1800)
    result: dict[str, Any] = {
        "nodes": args.nodes,
        "gpus": args.nodes * GPUS_PER_NODE,
        "dev_up_seconds": round(time.monotonic() - up_started, 1),
        "modes": {},
    }
    topology = Topology.parse("generic")
    try:
        crds = workdir / "crds"
        subprocess.run(
            [sys.executable, "-m", "phalanx.cli", "crds", "--output", str(crds)], check=True
        )
        cluster.kubectl("apply", "--server-side", "-f", str(crds))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds))
        cluster.start_operator(operator_env())
        if "kueue" in args.modes:
            # The quota is the whole cluster: what limits admission is topology, as for ours.
            cluster.start_kueue(
                levels=[level.label for level in topology.levels],
                node_labels={"nvidia.com/gpu.present": "true"},
                quota={GPU: str(args.nodes * GPUS_PER_NODE)},
            )
        bench = Bench(cluster, args.nodes, topology)
        time.sleep(5)
        for mode in args.modes:
            namespace = bench.namespace(f"scale-{mode}", mode)
            figures: dict[str, Any] = {}
            if mode == "ceiling":
                with tracked(bench, namespace, CEILING_LABEL) as tracker:
                    slots = sum(burst_sizes(args.gangs, args.nodes * GPUS_PER_NODE))
                    figures["free_burst"] = bench.ceiling(namespace, tracker, slots)
                result["modes"][mode] = figures
                checkpoint(result)
                print(json.dumps({mode: figures}), flush=True)
                continue
            bench.count_requests()
            bench.requests = 0.0
            jobs = 0
            with tracked(bench, namespace, JOB_LABEL) as tracker:
                for size in (64, 512):
                    if size <= args.nodes and args.reps:
                        figures[f"gang{size}_bind_seconds"] = bench.gang_latency(
                            namespace, mode, tracker, size, args.reps
                        )
                        jobs += args.reps
                        print(json.dumps({mode: figures}), flush=True)
                if args.gangs:
                    figures["free_burst"] = bench.free_burst(namespace, mode, tracker, args.gangs)
                    jobs += figures["free_burst"]["gangs"]
                    print(json.dumps({mode: figures}), flush=True)
                # Restarted with the namespace's earlier jobs gone: the time to list the
                # cluster again and admit a job that fits.
                figures["cold_restart_to_first_admission_seconds"] = bench.cold_restart(
                    namespace, mode, tracker
                )
                bench.clear(namespace, tracker)
                if args.contended:
                    figures["contended"] = bench.contended(
                        namespace, mode, tracker, args.contended, args.seed, args.window
                    )
                    jobs += args.contended
                    print(json.dumps({mode: figures}), flush=True)
                if args.pending and mode != "none":
                    figures["queue_depth"] = bench.queue_depth(
                        namespace, mode, tracker, args.pending, args.reps
                    )
                    jobs += args.pending + args.reps + 2
                    print(json.dumps({mode: figures}), flush=True)
            bench.count_requests()
            figures["operator_api_requests_per_job"] = round(bench.requests / max(1, jobs), 1)
            figures["operator"] = rss_mib(bench.operator_pid())
            result["modes"][mode] = figures
            checkpoint(result)
            print(json.dumps({mode: figures}), flush=True)
        ceiling = result["modes"].get("ceiling", {}).get("free_burst", {})
        for mode, figures in result["modes"].items():
            rate = figures.get("free_burst", {}).get("pods_bound_per_second")
            if mode != "ceiling" and rate and ceiling:
                figures["free_burst"]["fraction_of_ceiling"] = round(
                    rate / ceiling["pods_bound_per_second"], 3
                )
    finally:
        cluster.down()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each latency")
    parser.add_argument("--gangs", type=int, default=500, help="gangs in the free burst")
    parser.add_argument("--contended", type=int, default=300, help="jobs in the contended burst")
    parser.add_argument("--window", type=float, default=300.0, help="seconds of contended burst")
    parser.add_argument("--pending", type=int, default=5000, help="pending jobs for queue depth")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", default="scale.json", help="file name under bench/results")
    args = parser.parse_args()
    result = run_size(args, functools.partial(save, args))
    save(args, result)
    print(json.dumps(result, indent=2))


def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Merge this size's figures into the results file (after every mode, so a run cut
    short keeps what it measured)."""
    path = RESULTS / args.output
    RESULTS.mkdir(exist_ok=True)
    everything = json.loads(path.read_text()) if path.exists() else {}
    everything[str(args.nodes)] = {"arguments": vars(args), **result}
    path.write_text(json.dumps(everything, indent=2) + "\n")


if __name__ == "__main__":
    main()
