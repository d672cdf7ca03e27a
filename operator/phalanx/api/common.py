"""Building blocks shared by LLMTrainJob and InferenceService."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from phalanx.constants import ACCELERATOR_RESOURCES, LEVEL_ORDER, RESERVED_ENV

from .base import ApiModel, Rule

QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
# A Kubernetes quantity such as 8, "500m" or "100Gi" (int-or-string on the wire).
Quantity = int | Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=64)]
EnvName = Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)]
LevelName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]*$", max_length=63)]
DnsName = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
]

# Level name -> depth, as a CEL map literal (a list's indexOf costs too much for the budget).
_LEVELS_CEL = "{" + ", ".join(f"'{name}': {i}" for i, name in enumerate(LEVEL_ORDER)) + "}"
_RESERVED_CEL = "[" + ", ".join(f"'{name}'" for name in RESERVED_ENV) + "]"
_RESERVED_TEXT = ", ".join(RESERVED_ENV)


class EnvVar(ApiModel):
    """One environment variable for the workload's containers."""

    name: EnvName = Field(description="Variable name.")
    value: Annotated[str, StringConstraints(max_length=32768)] = Field(
        default="", description="Variable value."
    )


def reserved_env_rule(field: str) -> Rule:
    """Phalanx computes the rendezvous and rank variables; a user value would break the gang."""
    return Rule(
        cel=f"!has(self.{field[1:]}) || self.{field[1:]}.all(e, !(e.name in {_RESERVED_CEL}))",
        message=(
            f"{field[1:]}: these variables are set by Phalanx and cannot be overridden: "
            f"{_RESERVED_TEXT}. Remove them from the list."
        ),
        field=field,
        check=lambda m: all(e.name not in RESERVED_ENV for e in getattr(m, field[1:]) or []),
    )


EnvList = Annotated[list[EnvVar], Field(max_length=128)]


def env_field(description: str) -> Any:
    return Field(
        default_factory=list,
        description=description,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class Accelerator(ApiModel):
    """Which accelerator each pod gets; requests and limits are derived from it."""

    checks = (
        Rule(
            cel="self.type == 'cpu' || self.perNode >= 1",
            message="accelerator.perNode must be at least 1 for nvidia and ascend; use type: cpu for CPU-only pods.",
            field=".perNode",
            check=lambda m: m.type == "cpu" or m.per_node >= 1,
        ),
    )

    type: Literal["nvidia", "ascend", "cpu"] = Field(
        default="nvidia",
        description="Accelerator family: nvidia (NCCL), ascend (HCCL) or cpu (gloo).",
    )
    resource: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        default=None,
        description=(
            "Extended resource name requested per pod. Defaults to nvidia.com/gpu for nvidia "
            "and huawei.com/Ascend910 for ascend; ignored for cpu."
        ),
    )
    per_node: int = Field(
        default=8, ge=0, le=64, description="Accelerators per pod (one pod per node rank)."
    )
    product: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        default=None,
        description="Restrict placement to nodes whose nvidia.com/gpu.product label equals this value.",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request per pod, e.g. 32 or 500m.")
    memory: Quantity | None = Field(default=None, description="Memory request per pod, e.g. 512Gi.")

    def resource_name(self) -> str:
        """The extended resource to request, or "" for CPU-only pods."""
        if self.type == "cpu":
            return ""
        return self.resource or ACCELERATOR_RESOURCES[self.type]

    def count(self) -> int:
        return 0 if self.type == "cpu" else self.per_node


def _level_index(name: str | None) -> int:
    return LEVEL_ORDER.index(name) if name in LEVEL_ORDER else -1


class Topology(ApiModel):
    """Where the gang may be placed, in terms of the operator's topology levels."""

    checks = (
        Rule(
            cel=(
                "!has(self.required) || !has(self.preferred) || !(self.required in L) "
                "|| !(self.preferred in L) || L[self.preferred] >= L[self.required]"
            ).replace("L", _LEVELS_CEL),
            message=(
                "topology.preferred must be the same level as topology.required or finer "
                "(order: " + " > ".join(LEVEL_ORDER) + "); choose a finer preferred level."
            ),
            field=".preferred",
            check=lambda m: (
                m.required is None
                or m.preferred is None
                or min(_level_index(m.required), _level_index(m.preferred)) < 0
                or _level_index(m.preferred) >= _level_index(m.required)
            ),
        ),
    )

    required: LevelName | None = Field(
        default=None,
        description=(
            "All pods must sit inside one domain of this level (e.g. rack, block, zone) or a finer "
            "one; the gang waits rather than spread wider. Level names come from the operator's "
            "topology configuration."
        ),
    )
    preferred: LevelName | None = Field(
        default=None,
        description=(
            "The level to aim for (default: the tightest level that would hold the gang in an "
            "empty cluster). A queued gang waits up to preferredWaitSeconds for one domain of it, "
            "then takes the tightest domain that fits, up to `required`."
        ),
    )
    preferred_wait_seconds: int = Field(
        default=60,
        ge=0,
        le=86400,
        description=(
            "How long a queued gang waits for one domain of its preferred level (default: the "
            "tightest level that would hold it in an empty cluster) before it is placed more "
            "widely. 0 places it at once wherever it fits tightest now."
        ),
    )


class PodMetadata(ApiModel):
    """Labels and annotations merged into every pod."""

    labels: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, description="Labels added to each pod."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations added to each pod."
    )


class PodTemplateOverlay(ApiModel):
    """A partial pod template merged over the rendered pods (strategic-merge style)."""

    metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Labels and annotations merged into each pod."
    )
    spec: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "A partial PodSpec merged into each pod: tolerations, nodeSelector, affinity, volumes, "
            "securityContext, imagePullSecrets; `containers` entries merge by name (the main "
            "container is named `trainer` or `server`)."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """One aspect of the object's state, following Kubernetes API conventions."""

    type: Annotated[str, StringConstraints(max_length=64)] = Field(
        description="Condition type, e.g. Admitted."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Annotated[str, StringConstraints(max_length=128)] = Field(
        default="", description="PascalCase reason for the last transition."
    )
    message: Annotated[str, StringConstraints(max_length=4096)] = Field(
        default="", description="What happened and what to do about it."
    )
    last_transition_time: datetime | None = Field(
        default=None, description="When the status last flipped."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this condition was computed from."
    )


ConditionList = Annotated[list[Condition], Field(max_length=16)]


def conditions_field() -> Any:
    return Field(
        default_factory=list,
        description="Current state, one entry per condition type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
