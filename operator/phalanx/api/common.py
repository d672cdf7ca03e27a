"""Building blocks shared by LLMTrainJob and InferenceService."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints, WithJsonSchema
from pydantic_core import PydanticCustomError

from phalanx.constants import ACCELERATOR_RESOURCES, LEVEL_ORDER, RESERVED_ENV
from phalanx.quantity import parse_quantity

from .base import ApiModel, Rule

# The JSON-schema key the CRD generator reads to check a quantity's string form with CEL.
QUANTITY_KEY = "x-phalanx-quantity"
QUANTITY_MESSAGES = {
    "nonNegative": "must be a Kubernetes quantity such as 8, 500m or 100Gi, not negative",
    "positive": "must be a positive Kubernetes quantity such as 8, 500m or 100Gi",
}
QUANTITY_ERROR = "quantity"


def _quantity_check(kind: str) -> Callable[[str], str]:
    """The string form's check: Kubernetes' quantity grammar, then the sign."""

    def check(value: str) -> str:
        try:
            amount = None if value != value.strip() else parse_quantity(value)
        except ValueError:
            amount = None
        if amount is None or amount < 0 or (kind == "positive" and amount == 0):
            raise PydanticCustomError(QUANTITY_ERROR, QUANTITY_MESSAGES[kind])
        return value

    return check


def _quantity_text(kind: str) -> Any:
    return (
        StringConstraints(max_length=64),
        AfterValidator(_quantity_check(kind)),
        WithJsonSchema({"type": "string", "maxLength": 64, QUANTITY_KEY: kind}),
    )


# A Kubernetes quantity such as 8, "500m" or "100Gi" (int-or-string on the wire); sizes and
# requests must be positive, resource amounts in a pod template at least 0.
PositiveQuantity = Annotated[int, Field(gt=0)] | Annotated[str, *_quantity_text("positive")]
Quantity = Annotated[int, Field(ge=0)] | Annotated[str, *_quantity_text("nonNegative")]
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
    cpu: PositiveQuantity | None = Field(
        default=None, description="CPU request per pod, e.g. 32 or 500m."
    )
    memory: PositiveQuantity | None = Field(
        default=None, description="Memory request per pod, e.g. 512Gi."
    )

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
    """Labels and annotations merged into every pod (Phalanx's own keys always win)."""

    labels: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, description="Labels added to each pod."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations added to each pod."
    )


Free = dict[str, Any]


def free_field(description: str) -> Any:
    """An object passed to the pod as written; the pod API validates it when pods are created."""
    return Field(
        default=None,
        description=description,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class Toleration(ApiModel):
    """A toleration added to each pod (appended to the ones Phalanx sets)."""

    checks = (
        Rule(
            cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="podTemplate.spec.tolerations[]: operator Exists matches any value; remove value.",
            field=".value",
            check=lambda m: m.operator != "Exists" or not m.value,
        ),
    )

    key: Annotated[str, StringConstraints(max_length=316)] | None = Field(
        default=None, description="Taint key; empty with operator Exists matches every taint."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (default Equal)."
    )
    value: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        default=None, description="Taint value for operator Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; unset matches every effect."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


class LocalObjectName(ApiModel):
    """A reference to an object in the pod's namespace."""

    name: DnsName = Field(description="Object name.")


class EmptyDirVolume(ApiModel):
    medium: Literal["", "Memory"] | None = Field(default=None, description='"" or Memory.')
    size_limit: PositiveQuantity | None = Field(
        default=None, description="Largest size of the volume."
    )


class ClaimVolume(ApiModel):
    claim_name: DnsName = Field(description="PersistentVolumeClaim in the pod's namespace.")
    read_only: bool | None = Field(default=None, description="Mount read-only.")


# Pod Security Standard `restricted` allows only these volume kinds.
RESTRICTED_VOLUME_SOURCES = (
    "emptyDir",
    "configMap",
    "secret",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "csi",
    "ephemeral",
)
# `baseline` allows every kind but hostPath; the template offers nfs (datasets on a filer),
# `privileged` hostPath (devices and local disks). `phalanx.api.pod_security` holds the levels.
VOLUME_SOURCES = (*RESTRICTED_VOLUME_SOURCES, "nfs", "hostPath")


class NfsVolume(ApiModel):
    server: Annotated[str, StringConstraints(min_length=1, max_length=253)] = Field(
        description="Host name or address of the NFS server."
    )
    path: Annotated[str, StringConstraints(pattern=r"^/.*", max_length=1024)] = Field(
        description="Exported path."
    )
    read_only: bool | None = Field(default=None, description="Mount read-only.")


class HostPathVolume(ApiModel):
    path: Annotated[str, StringConstraints(pattern=r"^/.*", max_length=1024)] = Field(
        description="Path on the node, e.g. /dev/infiniband."
    )
    type: (
        Literal[
            "",
            "DirectoryOrCreate",
            "Directory",
            "FileOrCreate",
            "File",
            "Socket",
            "CharDevice",
            "BlockDevice",
        ]
        | None
    ) = Field(default=None, description="What must exist at the path (as in a PodSpec).")


class Volume(ApiModel):
    """A volume added to each pod. nfs needs the namespace's pod security level `baseline`,
    hostPath `privileged`; the other kinds are `restricted`'s."""

    checks = (
        Rule(
            cel=" + ".join(f"(has(self.{k}) ? 1 : 0)" for k in VOLUME_SOURCES) + " == 1",
            message=(
                "podTemplate.spec.volumes[]: give exactly one source, one of "
                + ", ".join(VOLUME_SOURCES)
                + "."
            ),
            check=lambda m: sum(getattr(m, _snake(k)) is not None for k in VOLUME_SOURCES) == 1,
        ),
    )

    name: DnsName = Field(description="Volume name, referenced by volumeMounts.")
    empty_dir: EmptyDirVolume | None = Field(default=None, description="A scratch directory.")
    config_map: Free | None = free_field("A ConfigMap's keys as files (as in a PodSpec).")
    secret: Free | None = free_field("A Secret's keys as files (as in a PodSpec).")
    persistent_volume_claim: ClaimVolume | None = Field(
        default=None, description="A PersistentVolumeClaim."
    )
    projected: Free | None = free_field("Projected sources (as in a PodSpec).")
    downward_api: Free | None = Field(
        default=None,
        alias="downwardAPI",
        description="Pod fields as files (as in a PodSpec).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    csi: Free | None = free_field("A CSI ephemeral volume (as in a PodSpec).")
    ephemeral: Free | None = free_field("A generic ephemeral volume (as in a PodSpec).")
    nfs: NfsVolume | None = Field(
        default=None, description="An NFS export (pod security level baseline or above)."
    )
    host_path: HostPathVolume | None = Field(
        default=None, description="A path on the node (pod security level privileged)."
    )


def _snake(name: str) -> str:
    return {"downwardAPI": "downward_api"}.get(
        name, "".join(f"_{c.lower()}" if c.isupper() else c for c in name)
    )


class VolumeMount(ApiModel):
    name: DnsName = Field(description="Name of a volume of the pod.")
    mount_path: Annotated[str, StringConstraints(pattern=r"^/.*", max_length=1024)] = Field(
        description="Absolute path in the container."
    )
    read_only: bool | None = Field(default=None, description="Mount read-only.")
    sub_path: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="Path inside the volume to mount."
    )


ResourceMap = Annotated[dict[str, Quantity], Field(max_length=16)]


class Resources(ApiModel):
    requests: ResourceMap | None = Field(
        default=None,
        description="Requests added to the container's (accelerators stay as derived).",
    )
    limits: ResourceMap | None = Field(
        default=None, description="Limits added to the container's (accelerators stay as derived)."
    )


# A Linux capability as a container names it (IPC_LOCK, NET_BIND_SERVICE).
CapabilityName = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]*$", max_length=64)]


class Capabilities(ApiModel):
    add: Annotated[list[CapabilityName], Field(max_length=32)] = Field(
        default_factory=list,
        description=(
            "Capabilities added to the container (every other one stays dropped): "
            "NET_BIND_SERVICE at any level, the baseline set (CHOWN, SETUID, ...) at baseline, "
            "any other (IPC_LOCK for RDMA, SYS_RESOURCE, ...) at privileged."
        ),
    )


class ContainerSecurityOverlay(ApiModel):
    """What the main container's security context may loosen, each as far as the namespace's
    pod security level allows (docs/operator.md); the rest stays `restricted`."""

    capabilities: Capabilities | None = Field(default=None, description="Capabilities added.")
    allow_privilege_escalation: bool | None = Field(
        default=None,
        description="true lets processes gain privileges (setuid binaries); baseline or above.",
    )
    privileged: bool | None = Field(
        default=None, description="true runs the container privileged; privileged level only."
    )


class ContainerOverlay(ApiModel):
    """Additions to the main container; its image, command and ports stay Phalanx's, its
    security context as `restricted` unless the namespace's level allows what is asked."""

    checks = (reserved_env_rule(".env"),)

    name: str = Field(description="The main container's name.")
    env: EnvList = env_field("Variables added to the container.")
    resources: Resources | None = Field(default=None, description="Requests and limits added.")
    volume_mounts: Annotated[list[VolumeMount], Field(max_length=32)] = Field(
        default_factory=list, description="Mounts of volumes added under podTemplate.spec.volumes."
    )
    security_context: ContainerSecurityOverlay | None = Field(
        default=None,
        description="Capabilities and privileges, within the namespace's pod security level.",
    )


class TrainerContainerOverlay(ContainerOverlay):
    name: Literal["trainer"] = Field(description="The main container: trainer.")


class ServerContainerOverlay(ContainerOverlay):
    name: Literal["server"] = Field(description="The main container: server.")


class PodSecurityOverlay(ApiModel):
    """The user and groups the pod runs as; the rest of its security context is fixed to the
    `restricted` pod security level (non-root, no privilege escalation, RuntimeDefault seccomp)."""

    run_as_user: int | None = Field(
        default=None,
        ge=0,
        le=2147483647,
        description="UID of the containers; 0 (root) needs pod security level baseline or above.",
    )
    run_as_group: int | None = Field(
        default=None, ge=0, le=2147483647, description="GID of the containers."
    )
    fs_group: int | None = Field(
        default=None, ge=0, le=2147483647, description="Group owning mounted volumes."
    )
    supplemental_groups: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=32)] = Field(
        default_factory=list, description="Extra groups of the containers."
    )


class PodSpecOverlay(ApiModel):
    """What a podTemplate may change, and nothing else: placement hints, extra volumes, pull
    secrets, the main container's env, resources, mounts and capabilities, the user it runs as,
    whether the service-account token is mounted, and the host network. Fields beyond the
    `restricted` pod security level (root, nfs and hostPath volumes, added capabilities,
    privileged, hostNetwork) are typed here because CEL cannot see the namespace; the operator
    refuses them unless the namespace's `phalanx.dev/pod-security` label allows them. The gang
    gate, service account, hostPID/hostIPC and Phalanx's env variables are never the
    template's to change."""

    node_selector: dict[str, Annotated[str, StringConstraints(max_length=253)]] = Field(
        default_factory=dict, description="Node labels every pod requires."
    )
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(
        default_factory=list, description="Tolerations added to each pod."
    )
    affinity: Free | None = free_field("Pod affinity and node affinity (as in a PodSpec).")
    topology_spread_constraints: Annotated[list[Free], Field(max_length=16)] = Field(
        default_factory=list,
        description="Spread constraints (as in a PodSpec).",
        json_schema_extra={
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        },
    )
    volumes: Annotated[list[Volume], Field(max_length=32)] = Field(
        default_factory=list,
        description="Volumes added to each pod: " + ", ".join(VOLUME_SOURCES) + ".",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    image_pull_secrets: Annotated[list[LocalObjectName], Field(max_length=16)] = Field(
        default_factory=list, description="Secrets for pulling the image."
    )
    security_context: PodSecurityOverlay | None = Field(
        default=None, description="The user and groups the pod runs as."
    )
    automount_service_account_token: bool | None = Field(
        default=None,
        description=(
            "Mount the namespace's default service-account token (default false: workloads "
            "do not talk to the Kubernetes API)."
        ),
    )
    host_network: bool | None = Field(
        default=None,
        description=(
            "true puts the pod in its node's network namespace (RDMA/RoCE without a device "
            "plugin); pod security level privileged only."
        ),
    )


class TrainerPodSpecOverlay(PodSpecOverlay):
    containers: Annotated[list[TrainerContainerOverlay], Field(max_length=1)] = Field(
        default_factory=list, description="Additions to the `trainer` container."
    )


class ServerPodSpecOverlay(PodSpecOverlay):
    containers: Annotated[list[ServerContainerOverlay], Field(max_length=1)] = Field(
        default_factory=list, description="Additions to the `server` container."
    )


class PodTemplateOverlay(ApiModel):
    """Labels, annotations and the allowed part of a PodSpec, merged into every pod."""

    metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Labels and annotations merged into each pod."
    )
    spec: PodSpecOverlay = Field(
        default_factory=PodSpecOverlay, description="The part of the PodSpec a template may set."
    )


class TrainerPodTemplate(PodTemplateOverlay):
    spec: TrainerPodSpecOverlay = Field(
        default_factory=TrainerPodSpecOverlay,
        description="The part of the PodSpec a template may set (see docs/operator.md).",
    )


class ServerPodTemplate(PodTemplateOverlay):
    spec: ServerPodSpecOverlay = Field(
        default_factory=ServerPodSpecOverlay,
        description="The part of the PodSpec a template may set (see docs/operator.md).",
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
