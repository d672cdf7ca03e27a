"""The Phalanx API (group phalanx.dev, version v1alpha1): models are the single source of truth."""

from __future__ import annotations

from .inference import InferenceService, InferenceServiceSpec, InferenceServiceStatus
from .trainjob import LLMTrainJob, LLMTrainJobSpec, LLMTrainJobStatus

__all__ = [
    "InferenceService",
    "InferenceServiceSpec",
    "InferenceServiceStatus",
    "LLMTrainJob",
    "LLMTrainJobSpec",
    "LLMTrainJobStatus",
]
