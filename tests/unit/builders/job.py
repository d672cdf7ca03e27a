"""LLMTrainJobs: a fluent spec builder and whole objects as the API server returns them."""

from __future__ import annotations

import copy
from typing import Any

from phalanx.api.trainjob import LLMTrainJob, LLMTrainJobSpec


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


def trainjob_object(
    phase: str | None = None,
    export: str | None = None,
    steps: list[int] | None = None,
    name: str = "gpt",
    **spec: Any,
) -> dict[str, Any]:
    """A train job as the cache holds it, with the export fields a trainer reported."""
    status: dict[str, Any] = {}
    if phase:
        status["phase"] = phase
    if export:
        status["exportPath"] = export
    if steps is not None:
        status["exportSteps"] = steps
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "LLMTrainJob",
        "metadata": {"name": name, "namespace": "ml", "uid": "12345678-aaaa"},
        "spec": spec,
        "status": status,
    }
