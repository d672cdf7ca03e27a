"""Shared helpers of the end-to-end tier (a plain module: test files import it by name)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from phalanx.devcluster import realnode
from phalanx.devcluster.cluster import DevCluster
from phalanx.devcluster.testing import ClusterHandle, Kubectl, wait_for

STEPS = 40
CHECKPOINT_EVERY = 10


def kernel_blocker() -> str | None:
    """Why this machine cannot run real nodes at all, or None."""
    if os.geteuid() != 0:
        return "real nodes need root (network and mount namespaces, cgroups)"
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network and mount namespaces: {probe.stderr.strip()}"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay file system"
    if not realnode.cgroup_mounts():
        return "no cgroup hierarchy is mounted"
    return None


class RealCluster:
    def __init__(self, cluster: DevCluster, handle: ClusterHandle, operator_log: Path) -> None:
        self.cluster = cluster
        self.handle = handle
        self.operator_log = operator_log
        self.kubectl = Kubectl(handle)

    def volume_dir(self, namespace: str, claim: str) -> Path:
        """Where a claim's data is on this machine (the dev provisioner's host directory)."""
        bound = self.kubectl.json("get", "pvc", claim, "-n", namespace)["spec"]["volumeName"]
        path = self.kubectl.json("get", "pv", bound)["spec"]["hostPath"]["path"]
        return Path(path)

    def operator_output(self) -> str:
        return self.operator_log.read_text(errors="replace")[-4000:]


def trainjob(name: str, *, steps: int = STEPS, **trainer: Any) -> dict[str, Any]:
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "LLMTrainJob",
        "metadata": {"name": name},
        "spec": {
            "nodes": 2,
            # More than half a real node's CPUs: the two ranks land on different nodes, so
            # rendezvous and gloo traffic cross nodes.
            "accelerator": {"type": "cpu", "cpu": "1200m", "memory": "2Gi"},
            "trainer": {
                "preset": "nano",
                "steps": steps,
                "batchSize": 4,
                "seqLen": 64,
                "checkpointEvery": CHECKPOINT_EVERY,
                **trainer,
            },
            "checkpoint": {"size": "2Gi", "accessModes": ["ReadWriteMany"]},
            "failurePolicy": {"maxRestarts": 2},
        },
    }


def inference_service(name: str, job: str, **model: Any) -> dict[str, Any]:
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": {"fromTrainJob": {"name": job, **model}},
            "replicas": 1,
            "accelerator": {"type": "cpu", "cpu": "500m", "memory": "2Gi"},
            "server": {"maxBatchSize": 4, "maxModelLen": 256},
        },
    }


def ready(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    lis = kubectl.json("get", "inferenceservices.phalanx.dev", name, "-n", namespace)
    conditions = {c["type"]: c for c in lis.get("status", {}).get("conditions", [])}
    return lis if conditions.get("Ready", {}).get("status") == "True" else None


def job(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return kubectl.json("get", "llmtrainjob", name, "-n", namespace)  # type: ignore[no-any-return]


def phase(kubectl: Kubectl, namespace: str, name: str) -> str:
    return str(job(kubectl, namespace, name).get("status", {}).get("phase", ""))


def wait_phase(
    cluster: RealCluster, namespace: str, name: str, wanted: str, timeout: float
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        current = job(cluster.kubectl, namespace, name)
        got = current.get("status", {}).get("phase")
        if got in ("Failed", "Succeeded") and got != wanted:
            raise AssertionError(
                f"job {name} ended {got}, not {wanted}: {json.dumps(current.get('status'))}\n"
                f"operator log tail:\n{cluster.operator_output()}"
            )
        return current if got == wanted else None

    return wait_for(reached, timeout, f"LLMTrainJob {name} to be {wanted}", interval=1)


def train_log(volume: Path) -> list[dict[str, Any]]:
    path = volume / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def claim_name(kubectl: Kubectl, namespace: str, name: str) -> str:
    claims = kubectl.json("get", "pvc", "-n", namespace, "-l", f"phalanx.dev/job={name}")["items"]
    assert len(claims) == 1, claims
    return str(claims[0]["metadata"]["name"])


# Values that move on their own (entropy, PID counters, open ptys), not settings.
VOLATILE_SYSCTLS = ("kernel/random/", "kernel/ns_last_pid", "kernel/pty/nr", "fs/")


def machine_snapshot() -> dict[str, str]:
    """What real nodes must leave as they found it: kernel settings, the machine's network
    namespace (links, routes, firewall), the mount table, network namespaces, cgroups, and no
    process of the cluster left running."""
    snapshot: dict[str, str] = {}
    for root in (Path("/proc/sys/kernel"), Path("/proc/sys/vm")):
        for path in sorted(root.rglob("*")):
            key = str(path.relative_to("/proc/sys"))
            if any(key.startswith(v) for v in VOLATILE_SYSCTLS) or not path.is_file():
                continue
            try:
                snapshot[f"sysctl {key}"] = path.read_text().strip()
            except OSError:
                continue
    for name, argv in {
        "links": ["ip", "-o", "link", "show"],
        "addresses": ["ip", "-o", "addr", "show"],
        "routes": ["ip", "route", "show", "table", "all"],
        "netns": ["ip", "netns", "list"],
        "iptables": ["iptables-save"],
    }.items():
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
        snapshot[name] = "\n".join(lines)
    snapshot["ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    snapshot["mounts"] = "\n".join(sorted(mounts))
    cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/phalanx-*"))
    snapshot["cgroups"] = "\n".join(cgroups)
    snapshot["processes"] = "\n".join(_cluster_processes())
    return snapshot


def _cluster_processes() -> list[str]:
    """Programs of the dev cluster still running: anything started from its binaries' cache
    (control plane, kubelets, containerd, CoreDNS, Prometheus, Kueue) or a container's runc
    shim. A clean `dev down` leaves none."""
    from phalanx.devcluster import paths

    cache = str(paths.cache_root())
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program = argv[0].decode(errors="replace") if argv and argv[0] else ""
        if program.startswith(cache) or program.endswith("containerd-shim-runc-v2"):
            found.append(Path(program).name)
    return sorted(found)


def snapshot_difference(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
