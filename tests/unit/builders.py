"""Small fluent builders for unit tests: jobs, pods and nodes as the API server returns them."""

from __future__ import annotations

import copy
from typing import Any

from phalanx.api.trainjob import LLMTrainJob, LLMTrainJobSpec
from phalanx.constants import GANG_GATE, LABEL_GENERATION, LABEL_JOB, LABEL_RANK


class JobBuilder:
    def __init__(self, name: str = "train", **spec: Any) -> None:
        self.name = name
        self.spec: dict[str, Any] = dict(spec)

    def set(self, **fields: Any) -> JobBuilder:
        self.spec.update(fields)
        return self

    def topology(self, required: str | None = None, preferred: str | None = None) -> JobBuilder:
        self.spec["topology"] = {
            k: v for k, v in (("required", required), ("preferred", preferred)) if v
        }
        return self

    def accelerator(self, **fields: Any) -> JobBuilder:
        self.spec["accelerator"] = fields
        return self

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "phalanx.dev/v1alpha1",
            "kind": "LLMTrainJob",
            "metadata": {"name": self.name, "namespace": "ml", "uid": "uid-1", "generation": 1},
            "spec": copy.deepcopy(self.spec),
        }

    def build(self) -> LLMTrainJobSpec:
        return LLMTrainJob.model_validate({"spec": self.spec}).spec


def make_job(name: str = "train", **spec: Any) -> JobBuilder:
    return JobBuilder(name, **spec)


def pod(
    job: str,
    rank: int,
    generation: int = 1,
    phase: str = "Pending",
    node: str | None = None,
    gated: bool = False,
    exit_code: int | None = None,
    reason: str | None = None,
    terminating: str | None = None,
    message: str | None = None,
    pod_reason: str | None = None,
    waiting: tuple[str, str] | None = None,
    image: str = "trainer:1",
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {
            "name": f"{job}-{rank}",
            "namespace": "ml",
            "labels": {LABEL_JOB: job, LABEL_RANK: str(rank), LABEL_GENERATION: str(generation)},
        },
        "spec": {"containers": [{"name": "trainer", "image": image}]},
        "status": {"phase": phase},
    }
    if node:
        obj["spec"]["nodeName"] = node
    if gated:
        obj["spec"]["schedulingGates"] = [{"name": GANG_GATE}]
    if exit_code is not None:
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason or "Error"}
        if message is not None:
            terminated["message"] = message
        obj["status"]["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": terminated}}
        ]
    if waiting is not None:
        obj["status"]["containerStatuses"] = [
            {
                "name": "trainer",
                "image": image,
                "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}},
            }
        ]
    if pod_reason is not None:
        obj["status"]["reason"] = pod_reason
    if terminating:
        obj["metadata"]["deletionTimestamp"] = terminating
        obj["metadata"]["deletionGracePeriodSeconds"] = 0
    return obj
