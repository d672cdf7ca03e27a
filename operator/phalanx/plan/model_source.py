"""Which model an InferenceService serves, or why it cannot be served yet. Pure.

`resolve_model` takes the parsed train job (for `fromTrainJob`; or why it did not parse), its
status, and the claim names known in the namespace; exports are only what the job's status
says the trainer reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from phalanx.api.inference import InferenceServiceSpec
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError
from phalanx.constants import Reason
from phalanx.render.inference import MODEL_DIR, ModelMount
from phalanx.render.trainjob import checkpoint_claim_name


@dataclass(frozen=True)
class ModelProblem:
    """Why the model cannot be served (yet): a condition reason and what to do about it."""

    reason: str
    message: str


def resolve_model(
    spec: InferenceServiceSpec,
    trainjob: LLMTrainJob | SpecError | None,
    trainjob_status: Mapping[str, Any],
    claims: frozenset[str] | None,
) -> ModelMount | ModelProblem:
    """The model to serve, from the spec and (for fromTrainJob) the job and its status.

    `trainjob` is None when no such job exists, a SpecError when it does not parse. `claims`
    are the claim names that exist in the namespace, or None when not known yet.
    """
    source = spec.model
    if source.builtin is not None:
        return ModelMount(path=f"builtin:{source.builtin}", revision=f"builtin:{source.builtin}")
    if source.claim is not None:
        claim = source.claim
        if claims is not None and claim.name not in claims:
            return ModelProblem(
                Reason.CLAIM_NOT_FOUND,
                f"PersistentVolumeClaim {claim.name} does not exist; create it or fix "
                "spec.model.claim.name.",
            )
        path = f"{MODEL_DIR}/{claim.path.strip('/')}".rstrip("/")
        return ModelMount(
            path=path, revision=f"claim:{claim.name}/{claim.path.strip('/')}", claim=claim.name
        )
    assert source.from_train_job is not None  # the API allows exactly one source
    wanted = source.from_train_job
    if trainjob is None:
        return ModelProblem(
            Reason.TRAIN_JOB_NOT_FOUND,
            f"LLMTrainJob {wanted.name} does not exist in this namespace; create it or fix "
            "spec.model.fromTrainJob.name.",
        )
    if isinstance(trainjob, SpecError):
        return ModelProblem(
            Reason.TRAIN_JOB_INVALID, f"LLMTrainJob {wanted.name} is invalid: {trainjob}"
        )
    job = trainjob
    claim_name = checkpoint_claim_name(wanted.name, job.spec)
    if claim_name is None:
        return ModelProblem(
            Reason.TRAIN_JOB_HAS_NO_CHECKPOINT,
            f"LLMTrainJob {wanted.name} keeps no checkpoint volume (checkpoint.enabled: false), "
            "so its export is lost; serve a claim or a job with a checkpoint volume.",
        )
    if claims is not None and claim_name not in claims:
        return ModelProblem(
            Reason.CLAIM_NOT_FOUND,
            f"The checkpoint claim {claim_name} of LLMTrainJob {wanted.name} does not exist.",
        )
    status = trainjob_status
    uid = str(job.metadata.get("uid") or "")[:8]
    if wanted.step is not None:
        # exports/step-N is a servable snapshot the trainer publishes atomically (COMPLETE
        # written last) and reports in exportSteps; checkpoints themselves are shards.
        steps = [s for s in status.get("exportSteps") or [] if isinstance(s, int)]
        if wanted.step not in steps:
            listed = ", ".join(str(s) for s in steps) if steps else "none yet"
            return ModelProblem(
                Reason.EXPORT_NOT_READY,
                f"LLMTrainJob {wanted.name} has not reported an export of step {wanted.step} "
                f"(export steps: {listed}); waiting. Steps are exported every "
                "spec.trainer.exportEvery steps.",
            )
        directory = f"exports/step-{wanted.step}"
    else:
        export = status.get("exportPath")
        if status.get("phase") != "Succeeded" or not export:
            phase = status.get("phase") or "Pending"
            detail = (
                "it succeeded but its trainer reported no export (exportPath)"
                if phase == "Succeeded"
                else f"phase {phase}; the model is served once the job succeeds"
            )
            return ModelProblem(
                Reason.EXPORT_NOT_READY, f"LLMTrainJob {wanted.name} has no export yet ({detail})."
            )
        directory = str(export).strip("/")
    return ModelMount(
        path=f"{MODEL_DIR}/{directory}",
        revision=f"{wanted.name}/{directory}@{uid}",
        claim=claim_name,
    )
