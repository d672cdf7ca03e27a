"""InferenceService: replicas of the Phalanx inference server behind one Service."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypedDict

from pydantic import Field, StringConstraints

from phalanx.constants import DEFAULT_SERVER_PORT, SERVER_IMAGE

from .base import ApiModel, Rule, section
from .common import (
    Accelerator,
    ConditionList,
    DnsName,
    EnvList,
    ServerPodTemplate,
    Topology,
    conditions_field,
    env_field,
    reserved_env_rule,
)

Str = Annotated[str, StringConstraints(max_length=4096)]
# An absolute count or a percentage of replicas, as in Deployments.
PERCENT_PATTERN = r"^[0-9]+%$"
IntOrPercent = (
    Annotated[int, Field(ge=0)]
    | Annotated[str, StringConstraints(pattern=PERCENT_PATTERN, max_length=8)]
)


def _is_zero(value: int | str) -> bool:
    """0, "0%", "00%": no replica at all, whatever spec.replicas is."""
    return value == 0 or (isinstance(value, str) and re.fullmatch(r"0+%", value) is not None)


def _zero_cel(field: str) -> str:
    return f"(type({field}) == int ? {field} == 0 : {field}.matches('^0+%$'))"


class FromTrainJob(ApiModel):
    """Serve the model an LLMTrainJob exported into its checkpoint volume."""

    name: DnsName = Field(description="Name of the LLMTrainJob in the same namespace.")
    step: int | None = Field(
        default=None, ge=0, description="Serve the export of this step instead of the final one."
    )


class ClaimSource(ApiModel):
    """Serve a model stored on a PersistentVolumeClaim."""

    name: DnsName = Field(description="Name of the PersistentVolumeClaim (mounted read-only).")
    path: Annotated[str, StringConstraints(max_length=1024)] = Field(
        default="",
        description="Directory inside the claim holding config.json, model.safetensors and tokenizer.json.",
    )


class ModelSource(ApiModel):
    """Where the weights come from: exactly one of fromTrainJob, claim or builtin."""

    checks = (
        Rule(
            cel="(has(self.fromTrainJob) ? 1 : 0) + (has(self.claim) ? 1 : 0) + (has(self.builtin) ? 1 : 0) == 1",
            message="model: set exactly one of fromTrainJob, claim or builtin.",
            check=lambda m: sum(x is not None for x in (m.from_train_job, m.claim, m.builtin)) == 1,
        ),
    )

    from_train_job: FromTrainJob | None = Field(
        default=None, description="Serve an LLMTrainJob's exported model."
    )
    claim: ClaimSource | None = Field(default=None, description="Serve a model from a claim.")
    builtin: Literal["tiny"] | None = Field(
        default=None, description="Serve a small built-in model, made locally (for demos)."
    )


class Autoscaling(ApiModel):
    """The built-in autoscaler; leave unset to scale only through spec.replicas (kubectl scale, HPA, KEDA)."""

    checks = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="autoscaling.minReplicas must not exceed autoscaling.maxReplicas.",
            field=".minReplicas",
            check=lambda m: m.min_replicas <= m.max_replicas,
        ),
    )

    min_replicas: int = Field(
        default=1, ge=0, le=1000, description="Lower bound; 0 allows scaling to zero."
    )
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Upper bound.")
    metric: Literal["requestsWaiting", "requestsRunning", "requestsInFlight"] = Field(
        default="requestsInFlight",
        description="Per-replica load signal scraped from each leader's /metrics (in flight = running + waiting).",
    )
    target: float = Field(
        default=8, gt=0, le=10000, description="Desired value of the metric per replica."
    )
    scale_up_stabilization_seconds: int = Field(
        default=0, ge=0, le=3600, description="Window for scale-up decisions (0 scales up at once)."
    )
    scale_down_delay_seconds: int = Field(
        default=300, ge=0, le=86400, description="Load must stay low this long before scaling down."
    )


class ServerSettings(ApiModel):
    """Flags of the Phalanx inference server."""

    max_batch_size: int = Field(
        default=32, ge=1, le=4096, description="Sequences decoded together (KV-cache slots)."
    )
    max_model_len: int = Field(
        default=2048, ge=16, le=1_048_576, description="Prompt plus completion tokens per request."
    )
    max_queue: int = Field(
        default=256, ge=0, le=100_000, description="Requests waiting before the server answers 429."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weight and activation dtype (auto: bf16 on GPU, fp32 on CPU)."
    )
    port: int = Field(default=DEFAULT_SERVER_PORT, ge=1024, le=65535, description="HTTP port.")
    served_model_name: DnsName | None = Field(
        default=None, description="Model name in the OpenAI API (default: the service name)."
    )
    extra_args: Annotated[list[Str], Field(max_length=128)] = Field(
        default_factory=list, description="Extra flags for the server."
    )


class Rollout(ApiModel):
    """How a new revision replaces the old one, group by group."""

    max_unavailable: IntOrPercent = Field(
        default=0,
        description="Replicas that may be unavailable during the update (count or percent).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    max_surge: IntOrPercent = Field(
        default=1,
        description="Extra replicas created above spec.replicas during the update (count or percent).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    progress_deadline_seconds: int = Field(
        default=900,
        ge=10,
        le=86400,
        description=(
            "A new-revision group not ready this long after creation stalls the rollout "
            "(old groups keep serving)."
        ),
    )


class InferenceServiceSpec(ApiModel):
    """The desired serving deployment."""

    checks = (
        reserved_env_rule(".env"),
        Rule(
            cel="!has(self.autoscaling) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)",
            message="replicas must lie within autoscaling.minReplicas..maxReplicas; adjust one of them.",
            field=".replicas",
            check=lambda m: (
                m.autoscaling is None
                or m.autoscaling.min_replicas <= m.replicas <= m.autoscaling.max_replicas
            ),
        ),
        Rule(
            cel=(
                "!("
                + _zero_cel("self.rollout.maxUnavailable")
                + " && "
                + _zero_cel("self.rollout.maxSurge")
                + ")"
            ),
            message="rollout.maxUnavailable and rollout.maxSurge cannot both be 0 (or 0%): the update could never progress.",
            field=".rollout",
            check=lambda m: (
                not (_is_zero(m.rollout.max_unavailable) and _is_zero(m.rollout.max_surge))
            ),
        ),
    )

    model: ModelSource = Field(description="The model to serve.")
    image: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        default=SERVER_IMAGE, description="Container image of the inference server."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy."
    )
    env: EnvList = env_field("Extra environment variables for the server.")
    replicas: int = Field(
        default=1, ge=0, le=1000, description="Serving groups (scale subresource)."
    )
    nodes_per_replica: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Pods per replica; more than one makes a leader + workers group placed as a gang.",
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Built-in autoscaler settings."
    )
    accelerator: Accelerator = section(Accelerator, "Accelerators of each pod.")
    topology: Topology = section(Topology, "Topology constraints of each multi-pod group.")
    server: ServerSettings = section(ServerSettings, "Inference server settings.")
    rollout: Rollout = section(Rollout, "Rolling update strategy.")
    pod_template: ServerPodTemplate | None = Field(
        default=None, description="Overlay merged into every pod."
    )


class InferenceServiceStatus(ApiModel):
    """The observed state of the serving deployment."""

    conditions: ConditionList = conditions_field()
    observed_generation: int | None = Field(
        default=None, description="Last .metadata.generation acted on."
    )
    replicas: int = Field(default=0, description="Groups that exist (scale subresource).")
    ready_replicas: int = Field(default=0, description="Groups whose every pod is ready.")
    updated_replicas: int = Field(default=0, description="Groups at the current revision.")
    selector: Str = Field(default="", description="Label selector of the pods (scale subresource).")
    url: Str = Field(default="", description="In-cluster URL of the OpenAI-compatible API.")
    model_revision: Str = Field(default="", description="The resolved model being served.")
    revision: Str = Field(
        default="", description="Hash of the pod template and model that groups roll towards."
    )
    stalled_revision: Str = Field(
        default="", description="A revision whose rollout stopped because a new group failed."
    )
    desired_replicas: int | None = Field(
        default=None, description="The built-in autoscaler's latest recommendation."
    )


class InferenceServiceStatusFields(TypedDict, total=False):
    """`InferenceServiceStatus` as the wire dict the planner fills (keys kept equal to the
    model's aliases by a unit test)."""

    conditions: list[dict[str, Any]]
    observedGeneration: int | None
    replicas: int
    readyReplicas: int
    updatedReplicas: int
    selector: str
    url: str
    modelRevision: str
    revision: str
    stalledRevision: str
    desiredReplicas: int


class InferenceService(ApiModel):
    """An OpenAI-compatible model server with replicas, autoscaling and rolling updates."""

    api_version: Literal["phalanx.dev/v1alpha1"] = "phalanx.dev/v1alpha1"
    kind: Literal["InferenceService"] = "InferenceService"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: InferenceServiceSpec
    status: InferenceServiceStatus | None = None


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Available", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Model", "type": "string", "jsonPath": ".status.modelRevision"},
    {"name": "URL", "type": "string", "jsonPath": ".status.url"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
