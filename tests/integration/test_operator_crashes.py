"""The operator killed and restarted again and again while a burst of gangs comes and goes.

The operator runs as its own process (`phalanx operator run`), SIGKILLed at random moments and
started again within a second, as a crash-looping pod would be. A watch on the namespace's pods
records every pod ever created and every moment's GPU bookings. Most gangs succeed; a few
have a rank that fails every time, so they restart to their limit while the kills land, some
between a restart's pod deletions and its status write. After the burst: no pod was created
twice for one (job, rank, generation), no gang restarted that never lost a pod, every failing
gang counted each of its restarts exactly once, and no node was ever promised more GPUs than it
has.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jobkit import Jobs, outcome
from kubernetes import client, config, watch

from phalanx import kube
from phalanx.devcluster.testing import Kubectl, wait_for

GPU = "nvidia.com/gpu"
GPUS_PER_NODE = 8
HOSTNAME = "kubernetes.io/hostname"
KILLS = 20
# 28 gangs of 1-8 hosts that succeed, and 6 of 4 hosts whose rank fails every time: 128 hosts
# in all against the cluster's 64, so a queue forms and drains.
SIZES = [1, 2, 4, 8, 1, 2, 4, 8, 4] * 3 + [2]
FAILING = 6
MAX_RESTARTS = 3


def pinned_node(spec: dict[str, Any]) -> str | None:
    """The node an ungated pod is promised by its `metadata.name` matchFields pin."""
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    for term in required.get("nodeSelectorTerms") or ():
        for field_ in term.get("matchFields") or ():
            if field_.get("key") == "metadata.name" and len(field_.get("values") or []) == 1:
                return str(field_["values"][0])
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OperatorProcess:
    """`phalanx operator run` as a child process, killed without warning on demand."""

    def __init__(self, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        env = {
            **os.environ,
            "PHALANX_METRICS_PORT": "0",
            "PHALANX_PROGRESS_INTERVAL": "0",
            "PHALANX_SCRAPE_INTERVAL": "0",
            **self.env,
        }
        phalanx = Path(sys.executable).with_name("phalanx")
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
            self.process = subprocess.Popen(
                [
                    str(phalanx), "operator", "run",
                    "--liveness", f"http://127.0.0.1:{_free_port()}/healthz",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        self.starts += 1

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class PodLedger:
    """Every pod of one namespace as a watch saw it: creations, and GPU bookings per node."""

    namespace: str
    created: dict[tuple[str, str, str], set[str]] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    overbooked: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        api = client.CoreV1Api(config.new_client_from_config(os.environ["KUBECONFIG"]))
        version = api.list_namespaced_pod(self.namespace).metadata.resource_version
        while not self.stop.is_set():
            stream = watch.Watch().stream(
                api.list_namespaced_pod,
                self.namespace,
                resource_version=version,
                timeout_seconds=5,
                allow_watch_bookmarks=True,
            )
            for event in stream:
                raw = event["raw_object"]
                version = raw["metadata"]["resourceVersion"]
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    self.observe(event["type"], raw)

    def observe(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        if kind == "ADDED" and "phalanx.dev/job" in labels:
            identity = (
                labels["phalanx.dev/job"],
                labels["phalanx.dev/rank"],
                labels["phalanx.dev/generation"],
            )
            self.created.setdefault(identity, set()).add(meta["uid"])
        if kind == "DELETED":
            self.pods.pop(meta["uid"], None)
        else:
            self.pods[meta["uid"]] = pod
        self._check_bookings()

    def _check_bookings(self) -> None:
        booked: dict[str, int] = {}
        for pod in self.pods.values():
            spec = pod["spec"]
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            node = spec.get("nodeName") or (
                None
                if spec.get("schedulingGates")
                else pinned_node(spec) or (spec.get("nodeSelector") or {}).get(HOSTNAME)
            )
            if node:
                gpus = int(spec["containers"][0]["resources"]["limits"].get(GPU, 0))
                booked[node] = booked.get(node, 0) + gpus
        for node, gpus in booked.items():
            if gpus > GPUS_PER_NODE:
                self.overbooked.append(f"{node}: {gpus} GPUs promised")


@pytest.fixture
def ledger(namespace: str) -> Iterator[PodLedger]:
    book = PodLedger(namespace)
    thread = threading.Thread(target=book.run, daemon=True)
    thread.start()
    yield book
    book.stop.set()
    thread.join(timeout=15)


def test_sigkilled_operator_never_duplicates_restarts_or_double_books(
    kubectl: Kubectl,
    namespace: str,
    crds: list[str],
    ledger: PodLedger,
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("PHALANX_CRASH_SEED", str(random.randrange(1 << 30))))
    kills, durations = random.Random(seed), random.Random(seed + 1)
    jobs = Jobs(kubectl, namespace)
    operator = OperatorProcess(tmp_path / "operator.log")
    names = [f"burst-{index}" for index in range(len(SIZES))]
    failing = [f"failing-{index}" for index in range(FAILING)]
    operator.start()

    def crash_loop() -> None:
        for _ in range(KILLS):
            time.sleep(kills.uniform(0.3, 2.5))
            operator.kill()
            time.sleep(kills.uniform(0.0, 1.0))
            operator.start()

    killer = threading.Thread(target=crash_loop)
    killer.start()
    try:
        # The burst arrives while the operator crash-loops.
        for index, (name, size) in enumerate(zip(names, SIZES, strict=True)):
            jobs.apply(
                name,
                nodes=size,
                accelerator={"type": "nvidia", "perNode": GPUS_PER_NODE},
                podTemplate=outcome("Succeeded", f"{durations.randint(6, 14)}s"),
            )
            if index % 5 == 0 and index // 5 < FAILING:
                jobs.apply(
                    failing[index // 5],
                    nodes=4,
                    accelerator={"type": "nvidia", "perNode": GPUS_PER_NODE},
                    failurePolicy={"maxRestarts": MAX_RESTARTS},
                    podTemplate=outcome("Failed", "2s", exit_code=1),
                )
        killer.join()

        def all_ended() -> bool:
            return all(jobs.status(n).get("phase") == "Succeeded" for n in names) and all(
                jobs.status(n).get("phase") == "Failed" for n in failing
            )

        wait_for(all_ended, 420, f"every gang to end (seed {seed})", interval=2)
    except BaseException:
        print(f"seed {seed}; operator log tail:\n{operator.tail()}")
        raise
    finally:
        killer.join()
        operator.kill()
    time.sleep(1)  # the ledger's watch catches up with the last events
    duplicates = {k: v for k, v in ledger.created.items() if len(v) > 1}
    assert duplicates == {}, f"pods created twice (seed {seed})"
    restarts = {name: jobs.status(name).get("restarts") for name in names}
    assert restarts == dict.fromkeys(names, 0), (
        f"gangs restarted though none lost a pod (seed {seed})"
    )
    counted = {
        name: (jobs.status(name).get("restarts"), jobs.status(name).get("gangGeneration"))
        for name in failing
    }
    assert counted == dict.fromkeys(failing, (MAX_RESTARTS, MAX_RESTARTS + 1)), (
        f"each restart counted once (seed {seed})"
    )
    assert ledger.overbooked == [], f"GPUs double-booked (seed {seed})"
    assert operator.starts == KILLS + 1
    assert len(ledger.created) >= sum(SIZES) + FAILING * 4 * (MAX_RESTARTS + 1)


def _freeze_pod_deletion(kubectl: Kubectl, namespace: str) -> str:
    """A ValidatingAdmissionPolicy that refuses every pod deletion in `namespace`: the moment
    between a restart's decision and its pod deletions, held open for as long as it exists."""
    name = f"freeze-{namespace}"[:63]
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["DELETE"],
                        "resources": ["pods"],
                    }
                ],
            },
            "validations": [{"expression": "false", "message": "pod deletion is frozen"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    for manifest in (policy, binding):
        kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe"},
        "spec": {
            "schedulingGates": [{"name": "phalanx.dev/test"}],
            "containers": [{"name": "c", "image": "none"}],
        },
    }
    kubectl.create(namespace, probe)
    wait_for(
        lambda: (
            "frozen"
            in kubectl(
                "delete", "pod", "probe", "-n", namespace, "--dry-run=server", check=False
            ).stderr
        ),
        30,
        "the deletion freeze to take effect",
    )
    return name


def test_a_restart_is_recorded_before_any_pod_is_deleted(
    kubectl: Kubectl, namespace: str, run_operator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator killed after deleting a failed gang's pods but before writing the restart
    # would find the current generation half gone and recreate it: two incarnations of one
    # generation, the restart never counted. Deletions frozen, the restart must still show.
    monkeypatch.setenv("PHALANX_METRICS_PORT", "0")
    monkeypatch.setenv("PHALANX_PROGRESS_INTERVAL", "0")
    jobs = Jobs(kubectl, namespace)
    with run_operator():
        jobs.apply(
            "frozen",
            nodes=2,
            accelerator={"type": "nvidia", "perNode": GPUS_PER_NODE},
            podTemplate=outcome("Succeeded", "300s"),
        )
        jobs.wait_phase("frozen", "Running", timeout=60)
        policy = _freeze_pod_deletion(kubectl, namespace)
        try:
            jobs.annotate_pod(
                "frozen-1",
                **{
                    "phalanx.dev/fake-outcome": "Failed",
                    "phalanx.dev/fake-exit-code": "3",
                    "phalanx.dev/fake-duration": "0s",
                },
            )
            status = jobs.wait_restarts("frozen", 1, timeout=60)
            assert status["gangGeneration"] == 2
            generations = {
                p["metadata"]["labels"]["phalanx.dev/generation"] for p in jobs.pods("frozen")
            }
            assert generations == {"1"}, "the old gang is still there: its deletion is frozen"
        finally:
            kubectl("delete", "validatingadmissionpolicybinding", policy, check=False)
            kubectl("delete", "validatingadmissionpolicy", policy, check=False)
        jobs.wait_pods(
            "frozen",
            lambda pods: (
                len(pods) == 2
                and all(p["metadata"]["labels"]["phalanx.dev/generation"] == "2" for p in pods)
                and all(p["status"].get("phase") == "Running" for p in pods)
            ),
            90,
            "the restarted gang running",
        )
        assert jobs.status("frozen")["restarts"] == 1


def test_a_standby_operator_takes_over_when_the_leader_is_killed(
    kubectl: Kubectl, namespace: str, crds: list[str], ledger: PodLedger, tmp_path: Path
) -> None:
    election = {
        "PHALANX_LEADER_ELECTION": "1",
        "PHALANX_LEADER_NAMESPACE": namespace,
        "PHALANX_LEASE_SECONDS": "6",
    }
    ports = {"first": _free_port(), "second": _free_port()}
    first = OperatorProcess(
        tmp_path / "first.log", {**election, "PHALANX_METRICS_PORT": str(ports["first"])}
    )
    second = OperatorProcess(
        tmp_path / "second.log", {**election, "PHALANX_METRICS_PORT": str(ports["second"])}
    )
    jobs = Jobs(kubectl, namespace)

    def holder() -> str:
        lease = kubectl.json("get", "lease", "phalanx-operator", "-n", namespace)
        return str(lease["spec"].get("holderIdentity") or "")

    def leading(replica: str) -> float | None:
        """The replica's phalanx_operator_leader, as Prometheus would scrape it."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[replica]}/metrics") as r:
                text = r.read().decode()
        except OSError:
            return None
        found = re.search(r"^phalanx_operator_leader (\S+)$", text, re.M)
        return float(found.group(1)) if found else None

    first.start()
    try:
        wait_for(lambda: f"_{first.pid}_" in holder(), 60, "the first operator to lead")
        second.start()
        wait_for(lambda: leading("second") == 0.0, 60, "the standby to say it stands by")
        assert leading("first") == 1.0
        names = [f"gang-{index}" for index in range(12)]
        for index, name in enumerate(names):
            jobs.apply(
                name,
                nodes=[2, 4, 8][index % 3],
                accelerator={"type": "nvidia", "perNode": GPUS_PER_NODE},
                podTemplate=outcome("Succeeded", "15s"),
            )
        wait_for(
            lambda: sum(jobs.status(n).get("phase") == "Running" for n in names) >= 3,
            90,
            "gangs running under the first operator",
        )
        assert f"_{first.pid}_" in holder()
        assert "leading as" not in second.log.read_text(), "the standby decided while led"
        first.kill()
        wait_for(lambda: f"_{second.pid}_" in holder(), 30, "the standby to take the lease")
        wait_for(lambda: leading("second") == 1.0, 10, "the new leader to say it leads")
        wait_for(
            lambda: all(jobs.status(n).get("phase") == "Succeeded" for n in names),
            240,
            "every gang to succeed under the second operator",
            interval=2,
        )
    except BaseException:
        print(f"first:\n{first.tail()}\nsecond:\n{second.tail()}")
        raise
    finally:
        first.kill()
        second.kill()
    time.sleep(1)
    assert {k: v for k, v in ledger.created.items() if len(v) > 1} == {}
    assert ledger.overbooked == [], "GPUs double-booked across the hand-over"
    assert {n: jobs.status(n).get("restarts") for n in names} == dict.fromkeys(names, 0)
    lease = kubectl.json("get", "lease", "phalanx-operator", "-n", namespace)
    assert lease["spec"]["leaseTransitions"] == 1


def _running_gang(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    """A 2-rank job whose admitted pods run, made by hand: no operator is involved."""
    from phalanx.api.trainjob import LLMTrainJob
    from phalanx.api.validate import parse
    from phalanx.render.trainjob import JobRef, render_pod

    jobs = Jobs(kubectl, namespace)
    jobs.apply(
        name,
        nodes=2,
        accelerator={"type": "nvidia", "perNode": GPUS_PER_NODE},
        podTemplate=outcome("Succeeded", "300s"),
    )
    obj = jobs.get(name)
    spec = parse(obj, LLMTrainJob).spec
    ref = JobRef(name, namespace, obj["metadata"]["uid"])
    for rank in (0, 1):
        pod = render_pod(ref, spec, rank, 1)
        pod["spec"].pop("schedulingGates", None)  # admitted: the gang is running
        kubectl.create(namespace, pod)
    return jobs.wait_pods(
        name,
        lambda ps: len(ps) == 2 and all(p["status"].get("phase") == "Running" for p in ps),
        60,
        "both ranks running",
    )


def test_no_reconcile_decides_before_the_first_lists(
    kubectl: Kubectl, namespace: str, crds: list[str]
) -> None:
    """Pods and the job are known, the nodes not yet: every Ready node would read as lost.
    The operator's workers wait for the first lists; the real handler, real API server."""
    import asyncio

    from phalanx import handlers, kube
    from phalanx.handlers import trainjob as handler
    from phalanx.handlers.state import Operator

    jobs = Jobs(kubectl, namespace)
    pods = _running_gang(kubectl, namespace, "early")
    kube.connect()
    op = Operator()
    for pod in pods:
        op.cache.put_pod(pod)
    op.cache.trainjobs.put(jobs.get("early"))
    key = (namespace, "early")

    async def scenario() -> None:
        worker = asyncio.create_task(
            handlers._after_sync(
                op, lambda: op.trainjobs.worker(lambda k: handler.reconcile(op, k))
            )
        )
        op.trainjobs.add(key)
        # Nothing may happen while the node list is out: a pass would find no Ready node.
        await asyncio.sleep(3)
        assert "restarts" not in jobs.status("early"), "a reconcile ran before the first lists"
        for node in await asyncio.to_thread(kube.list_all, "Node"):
            op.cache.nodes.put(node)
        op.cache.synced.set()
        await asyncio.to_thread(
            wait_for, lambda: "restarts" in jobs.status("early"), 30, "the first reconcile"
        )
        worker.cancel()

    asyncio.run(scenario())
    status = jobs.status("early")
    assert status["restarts"] == 0, status
    assert status["gangGeneration"] == 1


def test_a_rank_missing_only_from_the_cache_restarts_nothing(
    kubectl: Kubectl, namespace: str, crds: list[str]
) -> None:
    """A pod the watch has not delivered yet (or a create answered 409) is no lost rank: the
    reconcile asks the API server before it restarts a gang. The real handler runs against the
    real API server, with a cache that lacks one rank of a running gang."""
    import asyncio

    from phalanx import kube
    from phalanx.handlers import trainjob as handler
    from phalanx.handlers.state import Operator

    jobs = Jobs(kubectl, namespace)
    pods = _running_gang(kubectl, namespace, "cached")
    obj = jobs.get("cached")
    kube.connect()
    op = Operator()
    for node in kubectl.json("get", "nodes")["items"]:
        op.cache.nodes.put(node)
    op.cache.put_pod(pods[0])  # rank 1's watch event has not arrived
    # As the operator wrote it once the whole gang existed: only then is a missing rank lost.
    admitted = {"type": "Admitted", "status": "True", "reason": "GangAdmitted"}
    obj["status"] = {"gangGeneration": 1, "conditions": [admitted]}
    op.cache.trainjobs.put(obj)
    op.cache.synced.set()
    asyncio.run(handler.reconcile(op, (namespace, "cached")))
    status = jobs.status("cached")
    assert int(status.get("restarts") or 0) == 0, status
    assert int(status.get("gangGeneration") or 1) == 1
    assert all(not p["metadata"].get("deletionTimestamp") for p in jobs.pods("cached"))
    assert len(op.cache.pods_of_job((namespace, "cached"))) == 2


def test_a_delete_meant_for_an_earlier_pod_leaves_its_successor(
    kubectl: Kubectl, namespace: str
) -> None:
    """Pods are named by rank, so every generation reuses the names. A delete decided about the
    previous gang's pod, by an operator whose cache has not yet seen the new one (its
    predecessor created it, then was killed), must not remove the pod now bearing that name."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "rank-0"},
        "spec": {
            "schedulingGates": [{"name": "phalanx.dev/test"}],
            "containers": [{"name": "main", "image": "trainer:test"}],
        },
    }

    def uid() -> str:
        return str(kubectl.json("get", "pod", "rank-0", "-n", namespace)["metadata"]["uid"])

    kubectl.create(namespace, pod)
    earlier = uid()
    kubectl("delete", "pod", "rank-0", "-n", namespace, "--grace-period=0", "--force")
    kubectl.create(namespace, pod)
    successor = uid()
    assert successor != earlier

    assert kube.delete_pod(namespace, "rank-0", force=True, uid=earlier) is None
    assert uid() == successor
    kube.delete_pod(namespace, "rank-0", force=True, uid=successor)
    wait_for(lambda: not kubectl.exists("pod", "rank-0", "-n", namespace), 30, "the pod gone")
