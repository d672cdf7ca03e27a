"""Helpers for scenarios on the dev cluster: apply an LLMTrainJob or InferenceService, read it,
wait for its conditions, read its pods. `Objects` holds what both kinds share."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from phalanx.devcluster.testing import Kubectl, wait_for

# kwok ends a Running pod this way (see docs/devcluster.md).
OUTCOME = "phalanx.dev/fake-outcome"
EXIT_CODE = "phalanx.dev/fake-exit-code"
DURATION = "phalanx.dev/fake-duration"
TERMINATION_MESSAGE = "phalanx.dev/fake-termination-message"

# Accelerators: a whole 8-GPU node per pod, and one GPU.
GPU_NODE = {"type": "nvidia", "perNode": 8}
GPU_1 = {"type": "nvidia", "perNode": 1}
# Admitted by the CRD (affinity is passed to the pod as written) but refused by the pod API.
BAD_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "Bogus"}]}]
        }
    }
}


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("checkpoint", {"enabled": False})
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "LLMTrainJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def outcome(
    result: str = "Succeeded",
    after: str = "3s",
    exit_code: int | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A pod template overlay that makes every rank end `result` after `after` of running,
    optionally with `report` as its termination message (the trainer's classified end)."""
    annotations = {OUTCOME: result, DURATION: after}
    if exit_code is not None:
        annotations[EXIT_CODE] = str(exit_code)
    if report is not None:
        annotations[TERMINATION_MESSAGE] = json.dumps(report)
    return {"metadata": {"annotations": annotations}}


class Objects:
    """Custom objects of one kind in one namespace: create, read, patch, wait for conditions."""

    resource = ""
    kind = ""

    def __init__(self, kubectl: Kubectl, namespace: str) -> None:
        self.kubectl = kubectl
        self.namespace = namespace

    def create(self, name: str, spec: dict[str, Any]) -> None:
        manifest = {
            "apiVersion": "phalanx.dev/v1alpha1",
            "kind": self.kind,
            "metadata": {"name": name},
            "spec": spec,
        }
        self.kubectl.create(self.namespace, manifest)

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.kubectl.json("get", self.resource, name, "-n", self.namespace)
        return result

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        for condition in self.status(name).get("conditions") or []:
            if condition["type"] == kind:
                return dict(condition)
        return None

    def patch(self, name: str, patch: dict[str, Any]) -> None:
        self.kubectl(
            "patch", self.resource, name, "-n", self.namespace,
            "--type=merge", "-p", json.dumps(patch),
        )  # fmt: skip

    def wait_condition(
        self, name: str, kind: str, status: str, reason: str | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            found = self.condition(name, kind)
            if (
                found
                and found["status"] == status
                and (reason is None or found["reason"] == reason)
            ):
                return found
            return None

        return wait_for(
            matches,
            timeout,
            f"{name} condition {kind}={status} {reason or ''} (now {self.condition(name, kind)})",
        )


class Jobs(Objects):
    """LLMTrainJobs and their pods in one namespace."""

    resource = "llmtrainjob"
    kind = "LLMTrainJob"

    def apply(self, name: str, **spec: Any) -> None:
        self.kubectl.create(self.namespace, job_manifest(name, **spec))

    def pods(self, name: str) -> list[dict[str, Any]]:
        listing = self.kubectl.json(
            "get", "pods", "-n", self.namespace, "-l", f"phalanx.dev/job={name}"
        )
        return sorted(
            listing["items"], key=lambda p: int(p["metadata"]["labels"]["phalanx.dev/rank"])
        )

    def annotate_pod(self, pod: str, **annotations: str) -> None:
        pairs = [f"{k.replace('_', '-')}={v}" for k, v in annotations.items()]
        self.kubectl("annotate", "pod", pod, "-n", self.namespace, "--overwrite", *pairs)

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout,
            f"LLMTrainJob {name} to reach phase {phase}",
        )

    def wait_restarts(self, name: str, count: int, timeout: float = 60) -> dict[str, Any]:
        """Restarts are counted for good, unlike the Restarting condition, which is brief."""
        return wait_for(
            lambda: int((s := self.status(name)).get("restarts") or 0) >= count and s,
            timeout,
            f"LLMTrainJob {name} to restart {count} time(s)",
        )

    def events(self, name: str, reason: str) -> list[str]:
        listing = self.kubectl.json(
            "get", "events", "-n", self.namespace,
            "--field-selector", f"involvedObject.name={name},reason={reason}",
        )  # fmt: skip
        return [str(e["message"]) for e in listing["items"]]

    def wait_pods(
        self,
        name: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float,
        what: str,
    ) -> list[dict[str, Any]]:
        return wait_for(
            lambda: (pods := self.pods(name)) and predicate(pods) and pods,
            timeout,
            f"{name}: {what}",
        )


class Services(Objects):
    """InferenceServices and their pods in one namespace."""

    resource = "inferenceservice"
    kind = "InferenceService"

    def apply(self, name: str, **spec: Any) -> None:
        spec.setdefault("model", {"builtin": "tiny"})
        self.create(name, spec)

    def pods(self, name: str) -> list[dict[str, Any]]:
        listing = self.kubectl.json(
            "get", "pods", "-n", self.namespace, "-l", f"phalanx.dev/inference-service={name}"
        )
        return [p for p in listing["items"] if not p["metadata"].get("deletionTimestamp")]

    def wait_ready_groups(self, name: str, count: int, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: (
                (s := self.status(name)).get("readyReplicas") == count
                and s.get("replicas") == count
                and s
            ),
            timeout,
            f"{name} to have {count} ready groups (now {self.status(name).get('readyReplicas')})",
        )


def gated(pod: dict[str, Any]) -> bool:
    return bool(pod["spec"].get("schedulingGates"))


def env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


def node_labels(kubectl: Kubectl, node: str) -> dict[str, str]:
    labels: dict[str, str] = kubectl.json("get", "node", node)["metadata"]["labels"]
    return labels
