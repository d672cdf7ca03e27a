"""`phalanx dev demo`: train a model on real nodes through the operator, then serve it.

One command, each step cached: the binaries (`dev build`), the images (`dev images`), a
cluster with two real kubelet nodes and the operator, `jobs/tiny-cpu.yaml` trained while
its progress is printed, an InferenceService serving the export, and one completion from it.
The cluster stays up afterwards, to look around; `phalanx dev down` stops it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phalanx.devcluster import build, paths
from phalanx.devcluster.cluster import DevCluster
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.images import ImageBuilder, repository_root

Progress = Callable[[str], None]
JOB = "tiny-cpu"
SERVICE = "tiny-cpu-chat"
DEMO_NODES = 2


def run_demo(report: Progress, cluster_dir: Path | None = None) -> None:
    started = time.monotonic()
    repo = repository_root()
    bin_dir = build.ensure_binaries(progress=report)
    ImageBuilder(progress=report).build_all()
    cluster = DevCluster(cluster_dir or paths.default_state_dir())
    kubeconfig = cluster.up(profile="cpu", nodes=0, real=DEMO_NODES, timeout=600, progress=report)
    kubectl = _Kubectl(bin_dir / "kubectl", kubeconfig)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(repo / "crds"))
    kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    operator_log = cluster.start_operator({"PHALANX_PROGRESS_INTERVAL": "2"})
    report(f"operator running (log: {operator_log})")
    prometheus_url = cluster.start_prometheus()
    report(f"Prometheus scraping the trainer, server and operator: {prometheus_url}")

    kubectl("apply", "-f", str(repo / "jobs" / f"{JOB}.yaml"))
    report(f"training {JOB} on the real nodes (kubectl get ltj {JOB}):")
    last = ""
    deadline = time.monotonic() + 1800
    while True:
        job = kubectl.json("get", "ltj", JOB)
        status = job.get("status") or {}
        line = kubectl("get", "ltj", JOB, "--no-headers").strip()
        if line != last:
            report(f"  {line}")
            last = line
        if status.get("phase") == "Succeeded":
            break
        if status.get("phase") == "Failed" or time.monotonic() > deadline:
            raise DevClusterError(f"{JOB} did not succeed: {json.dumps(status)[:600]}")
        time.sleep(2)

    kubectl("apply", "-f", str(repo / "jobs" / "serve-tiny-cpu-export.yaml"))
    report(f"serving the export with InferenceService {SERVICE} ...")
    kubectl(
        "wait",
        "--for=condition=Ready",
        f"inferenceservices.phalanx.dev/{SERVICE}",
        "--timeout=600s",
    )
    text = _complete(kubectl, "Once upon a time")
    report(f"completion from the model {JOB} just trained: {text!r}")
    report(f"demo done in {time.monotonic() - started:.0f}s. Look around:")
    report(f"  export KUBECONFIG={kubeconfig}")
    report("  kubectl get ltj,lis,pods -o wide")
    report(f"  kubectl port-forward service/{SERVICE} 8000:80   # then the OpenAI API on :8000/v1")
    report(
        f"  curl -s '{prometheus_url}/api/v1/query?query=phalanx_train_loss'   # the dashboards' "
        "queries (charts/phalanx/dashboards) run there as they are"
    )
    report("  phalanx dev exec -- curl -s <pod IP>:9400/metrics   # a trainer's Prometheus metrics")
    report("Stop everything with: phalanx dev down")


def _complete(kubectl: _Kubectl, prompt: str) -> str:
    forward = subprocess.Popen(
        [*kubectl.base, "port-forward", f"service/{SERVICE}", "0:80"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert forward.stdout is not None
        match = re.search(r"127\.0\.0\.1:(\d+)", forward.stdout.readline())
        if not match:
            raise DevClusterError("kubectl port-forward did not start")
        base = f"http://127.0.0.1:{match.group(1)}/v1"
        with urllib.request.urlopen(f"{base}/models", timeout=30) as reply:
            model = json.load(reply)["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 24}).encode()
        request = urllib.request.Request(
            f"{base}/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            return str(json.load(reply)["choices"][0]["text"])
    finally:
        forward.terminate()
        forward.wait(10)


class _Kubectl:
    def __init__(self, binary: Path, kubeconfig: Path) -> None:
        self.base = [str(binary), f"--kubeconfig={kubeconfig}"]

    def __call__(self, *args: str) -> str:
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise DevClusterError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))
