"""Real nodes: image sizes, pod start latency, and gang restart time, on this machine.

    python bench/real_nodes.py [--repeat 3]

Brings up a dev cluster with two real kubelet nodes (`phalanx dev up --real 2`, images as
`phalanx dev images` built them) and the operator, then measures, repeated:
- pod start latency: a pod of the trainer image created -> Running (the image is on the node,
  so this is sandbox + CNI + container start), and the same for the 1.4 MB pause image as the
  floor of what the kubelet, containerd and runc cost;
- gang restart time: in a 2-rank nano LLMTrainJob that is training, rank 1's container is
  SIGKILLed; measured until both generation-2 pods are Running, and until the trainer reports
  training again (rank 0's /progress step past the step it resumed from).
Writes bench/results/real_nodes.json. Wall times on a shared 2-core machine: min and median.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))

from realkit import trainjob  # noqa: E402

from phalanx.devcluster import paths  # noqa: E402
from phalanx.devcluster.cluster import DevCluster  # noqa: E402
from phalanx.devcluster.images import IMAGES, PAUSE_IMAGE, ImageBuilder  # noqa: E402
from phalanx.devcluster.testing import ClusterHandle, Kubectl, wait_for  # noqa: E402


def pod(name: str, image: str, command: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"phalanx.dev/real-node": "true"},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {"name": "main", "image": image, "imagePullPolicy": "Never", "command": command}
            ],
        },
    }


def pod_start(kubectl: Kubectl, namespace: str, name: str, image: str, command: list[str]) -> float:
    started = time.monotonic()
    kubectl.create(namespace, pod(name, image, command))

    def running() -> bool:
        status = kubectl.json("get", "pod", name, "-n", namespace).get("status", {})
        return status.get("phase") == "Running"

    wait_for(running, 300, f"pod {name} Running", interval=0.05)
    elapsed = time.monotonic() - started
    kubectl("delete", "pod", name, "-n", namespace, "--wait=false")
    return elapsed


def gang_restart(kubectl: Kubectl, namespace: str, name: str) -> tuple[float, float]:
    kubectl.create(namespace, trainjob(name, steps=400))

    def status() -> dict[str, Any]:
        return kubectl.json("get", "ltj", name, "-n", namespace).get("status", {})  # type: ignore[no-any-return]

    wait_for(
        lambda: (status().get("progress") or {}).get("lastCheckpointStep"),
        600,
        "a checkpoint",
        interval=0.5,
    )
    rank1 = kubectl.json("get", "pod", f"{name}-1", "-n", namespace)
    uid = rank1["metadata"]["uid"]
    container = rank1["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    killed = time.monotonic()
    for procs in Path("/sys/fs/cgroup/memory").glob("phalanx-*/**/cgroup.procs"):
        if f"pod{uid}" in str(procs) and container in str(procs):
            for pid in procs.read_text().split():
                os.kill(int(pid), signal.SIGKILL)

    def generation_two_running() -> bool:
        pods = kubectl.json("get", "pods", "-n", namespace, "-l", f"phalanx.dev/job={name}")[
            "items"
        ]
        return len(pods) == 2 and all(
            p["metadata"]["labels"].get("phalanx.dev/generation") == "2"
            and p.get("status", {}).get("phase") == "Running"
            for p in pods
        )

    wait_for(generation_two_running, 600, "generation 2 Running", interval=0.1)
    pods_running = time.monotonic() - killed
    resumed_from = status()["progress"].get("lastCheckpointStep") or 0

    def training_again() -> bool:
        progress = status().get("progress") or {}
        return status().get("restarts") == 1 and (progress.get("step") or 0) > resumed_from

    wait_for(training_again, 600, "training again after the restart", interval=0.2)
    training = time.monotonic() - killed
    kubectl("delete", "ltj", name, "-n", namespace, "--wait=false")
    return pods_running, training


def summary(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "n": len(values),
    }


def image_sizes(builder: ImageBuilder) -> dict[str, str]:
    out = builder.buildah.script(
        "buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}'", what="sizes"
    )
    return dict(line.split(" ", 1) for line in out.strip().splitlines())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    builder = ImageBuilder(progress=print)
    builder.build_all()
    cluster = DevCluster(paths.default_state_dir("bench-real"))
    cluster.down()
    results: dict[str, Any] = {
        "machine": "shared 2-core VM, cgroup v1, containerd 2.4.2, kubelet v1.36.3"
    }
    try:
        started = time.monotonic()
        kubeconfig = cluster.up(profile="cpu", nodes=0, real=2, timeout=1200, progress=print)
        results["cluster_up_seconds"] = round(time.monotonic() - started, 1)
        kubectl = Kubectl(ClusterHandle(kubeconfig, paths.bin_dir() / "kubectl", cluster.root))
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(HERE.parent / "crds"))
        kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        cluster.start_operator({"PHALANX_PROGRESS_INTERVAL": "1"})
        kubectl("create", "namespace", "bench")
        wait_for(
            lambda: kubectl.exists("serviceaccount", "default", "-n", "bench"), 30, "default SA"
        )
        trainer = next(i.tag for i in IMAGES if i.name == "trainer")
        starts = {"pause": [], "trainer": []}  # type: dict[str, list[float]]
        for run in range(args.repeat):
            starts["pause"].append(
                pod_start(kubectl, "bench", f"pause-{run}", PAUSE_IMAGE, ["/pause"])
            )
            starts["trainer"].append(
                pod_start(kubectl, "bench", f"trainer-{run}", trainer, ["sleep", "60"])
            )
        results["pod_start_seconds"] = {image: summary(v) for image, v in starts.items()}
        restarts = [gang_restart(kubectl, "bench", f"restart-{run}") for run in range(args.repeat)]
        results["gang_restart_seconds"] = {
            "killed_to_all_pods_running": summary([r[0] for r in restarts]),
            "killed_to_training_again": summary([r[1] for r in restarts]),
        }
        results["image_sizes"] = image_sizes(builder)
    finally:
        cluster.down()
    out = HERE / "results" / "real_nodes.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
