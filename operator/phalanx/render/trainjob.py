"""What an LLMTrainJob should create: one pod per node rank, a headless Service, the
checkpoint claim and, for HCCL, the rank-table ConfigMap. Pure: spec in, dicts out."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from phalanx.api.pod_security import DEFAULT_LEVEL, PodSecurityLevel
from phalanx.api.trainjob import LLMTrainJobSpec
from phalanx.constants import (
    GANG_GATE,
    KUEUE_POD_GROUP_COUNT_ANNOTATION,
    KUEUE_POD_GROUP_LABEL,
    KUEUE_QUEUE_LABEL,
    KUEUE_RETRIABLE_IN_GROUP_ANNOTATION,
    LABEL_GENERATION,
    LABEL_JOB,
    LABEL_RANK,
    TERMINATION_LOG,
    TRAINJOB_KIND,
)

from .env import HCCL_DIR, training_env
from .hccl import rank_table
from .owner import OwnerRef
from .pod import (
    accelerator_resources,
    accelerator_scheduling,
    apply_overlay,
    container_security,
    pod_skeleton,
)

# Long enough for rank 0 to finish writing a sharded checkpoint after SIGTERM.
TERMINATION_GRACE_SECONDS = 600
CONTAINER = "trainer"
CHECKPOINT_VOLUME = "checkpoint"
SCHEDULER_NAMES = {"volcano": "volcano", "coscheduling": "scheduler-plugins-scheduler"}


class JobRef(OwnerRef):
    """Identity of the owning job, enough for names, labels and the owner reference."""

    kind = TRAINJOB_KIND


def pod_name(job: str, rank: int) -> str:
    return f"{job}-{rank}"


def checkpoint_claim_name(job: str, spec: LLMTrainJobSpec) -> str | None:
    if not spec.checkpoint.enabled:
        return None
    return spec.checkpoint.existing_claim or f"{job}-checkpoint"


def job_labels(job: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "phalanx-trainer",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "phalanx",
        "app.kubernetes.io/part-of": "phalanx",
        LABEL_JOB: job,
    }


def _metadata(ref: JobRef, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return ref.child_metadata(name, labels or job_labels(ref.name))


# The device the accelerator type asks for: the trainer fails (InvalidConfig) when it is not
# there, instead of quietly training on CPU in a pod that was given GPUs.
TRAINER_DEVICE = {"nvidia": "cuda", "ascend": "npu", "cpu": "cpu"}


def data_path(spec: LLMTrainJobSpec) -> str:
    """spec.trainer.data as the trainer must see it: a relative path is under the checkpoint
    volume (as documented), not under the container's working directory."""
    return posixpath.join(spec.checkpoint.mount_path, spec.trainer.data)


def trainer_args(spec: LLMTrainJobSpec) -> list[str]:
    """Flags of the Phalanx trainer derived from spec.trainer."""
    t = spec.trainer
    args = [
        "--device", TRAINER_DEVICE[spec.accelerator.type],
        "--preset", t.preset,
        "--steps", str(t.steps),
        "--batch-size", str(t.batch_size),
        "--seq-len", str(t.seq_len),
        "--grad-accum", str(t.grad_accum),
        "--lr", repr(t.learning_rate),
        "--parallelism", t.parallelism,
        "--precision", t.precision,
        "--checkpoint-every", str(t.checkpoint_every),
        "--keep", str(spec.checkpoint.keep),
        "--checkpoint-dir", spec.checkpoint.mount_path,
        "--metrics-port", str(t.metrics_port),
    ]  # fmt: skip
    if t.export_every:
        args += ["--export-every", str(t.export_every)]
    if t.tensor_parallel > 1:
        args += ["--tensor-parallel", str(t.tensor_parallel)]
    if t.data != "builtin":
        args += ["--data", data_path(spec)]
    if t.compile:
        args.append("--compile")
    return [*args, *t.extra_args]


def _volumes(
    ref: JobRef, spec: LLMTrainJobSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    claim = checkpoint_claim_name(ref.name, spec)
    checkpoint: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}}
    )
    volumes = [
        {"name": CHECKPOINT_VOLUME, **checkpoint},
        # NCCL and the data loader use shared memory well beyond the container default of 64Mi.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": CHECKPOINT_VOLUME, "mountPath": spec.checkpoint.mount_path},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if spec.backend() == "hccl":
        volumes.append({"name": "hccl", "configMap": {"name": hccl_configmap_name(ref.name)}})
        mounts.append({"name": "hccl", "mountPath": HCCL_DIR, "readOnly": True})
    return volumes, mounts


def _scheduling(spec: LLMTrainJobSpec) -> dict[str, Any]:
    policy = spec.run_policy
    pod: dict[str, Any] = {}
    if policy.gang_scheduler == "builtin":
        pod["schedulingGates"] = [{"name": GANG_GATE}]
    scheduler = policy.scheduler_name or SCHEDULER_NAMES.get(policy.gang_scheduler)
    if scheduler:
        pod["schedulerName"] = scheduler
    if policy.priority_class_name:
        pod["priorityClassName"] = policy.priority_class_name
    return {**pod, **accelerator_scheduling(spec.accelerator)}


def kueue_pod_group(job: str, generation: int) -> str:
    """The Kueue pod group of one gang generation: Kueue admits the group as one Workload, and
    a restarted gang is a new group rather than replacements inside a finished one."""
    return f"{job}-{generation}"


def _gang_labels(ref: JobRef, spec: LLMTrainJobSpec, generation: int) -> dict[str, str]:
    """Labels external gang schedulers key on."""
    policy = spec.run_policy
    if policy.gang_scheduler == "coscheduling":
        return {"scheduling.x-k8s.io/pod-group": ref.name}
    if policy.gang_scheduler == "kueue":
        labels = {KUEUE_POD_GROUP_LABEL: kueue_pod_group(ref.name, generation)}
        if policy.queue_name:
            labels[KUEUE_QUEUE_LABEL] = policy.queue_name
        return labels
    return {}


def _gang_annotations(ref: JobRef, spec: LLMTrainJobSpec) -> dict[str, str]:
    if spec.run_policy.gang_scheduler == "volcano":
        return {"scheduling.k8s.io/group-name": ref.name}
    if spec.run_policy.gang_scheduler == "kueue":
        # Kueue admits the pod group once this many pods of it exist, as one Workload. The
        # operator restarts a gang as a new group (of the next generation), so a group whose
        # pods all ended is finished, not waiting for replacements: Kueue then releases its
        # quota and the finalizers it keeps on the pods.
        return {
            KUEUE_POD_GROUP_COUNT_ANNOTATION: str(spec.nodes),
            KUEUE_RETRIABLE_IN_GROUP_ANNOTATION: "false",
        }
    return {}


def metrics_ports(spec: LLMTrainJobSpec) -> list[dict[str, Any]]:
    """One declared port per local rank (`metrics`, `metrics-1`, ...): every rank serves
    /metrics and /progress on the base port plus its local rank, and a pod scrape finds only
    declared ports."""
    base = spec.trainer.metrics_port
    return [
        {"name": "metrics" if local == 0 else f"metrics-{local}", "containerPort": base + local}
        for local in range(spec.nproc_per_node())
    ]


def render_pod(ref: JobRef, spec: LLMTrainJobSpec, rank: int, generation: int) -> dict[str, Any]:
    """The pod of node rank `rank` in gang generation `generation` (gated until admitted)."""
    labels = {
        **job_labels(ref.name),
        LABEL_RANK: str(rank),
        LABEL_GENERATION: str(generation),
        **_gang_labels(ref, spec, generation),
    }
    volumes, mounts = _volumes(ref, spec)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": spec.command
        if spec.command is not None
        else ["torchrun", "-m", "phalanx_trainer"],
        "args": spec.args
        if spec.args is not None
        else (trainer_args(spec) if spec.command is None else []),
        "env": training_env(ref.name, ref.namespace, spec, rank, generation),
        "ports": [
            {"name": "rendezvous", "containerPort": spec.communication.master_port},
            *metrics_ports(spec),
        ],
        "resources": accelerator_resources(spec.accelerator),
        "volumeMounts": mounts,
        # The trainer's classified end (docs/progress-contract.md) reaches the operator here.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": container_security(),
    }
    metadata = _metadata(ref, pod_name(ref.name, rank), labels)
    annotations = _gang_annotations(ref, spec)
    if annotations:
        metadata["annotations"] = annotations
    pod = pod_skeleton(
        metadata,
        hostname=pod_name(ref.name, rank),
        subdomain=ref.name,
        restart_policy="Never",
        grace_seconds=TERMINATION_GRACE_SECONDS,
        container=container,
        volumes=volumes,
        scheduling=_scheduling(spec),
    )
    return apply_overlay(pod, spec.pod_template, labels, ref.pod_security)


def render_pods(ref: JobRef, spec: LLMTrainJobSpec, generation: int) -> list[dict[str, Any]]:
    return [render_pod(ref, spec, rank, generation) for rank in range(spec.nodes)]


def render_service(ref: JobRef, spec: LLMTrainJobSpec) -> dict[str, Any]:
    """Headless Service giving every rank a stable DNS name, ready or not (rendezvous comes first)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, ref.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: ref.name},
            "ports": [
                {"name": "rendezvous", "port": spec.communication.master_port},
                {"name": "metrics", "port": spec.trainer.metrics_port},
            ],
        },
    }


def render_checkpoint_claim(ref: JobRef, spec: LLMTrainJobSpec) -> dict[str, Any] | None:
    """The claim Phalanx creates, or None when the job brings its own or uses none.

    Not owned by the job: checkpoints outlive it so that an InferenceService can serve them.
    """
    checkpoint = spec.checkpoint
    if not checkpoint.enabled or checkpoint.existing_claim:
        return None
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": checkpoint_claim_name(ref.name, spec),
            "namespace": ref.namespace,
            "labels": job_labels(ref.name),
        },
        "spec": {
            "accessModes": list(checkpoint.access_modes),
            "resources": {"requests": {"storage": str(checkpoint.size)}},
        },
    }
    if checkpoint.storage_class_name:
        claim["spec"]["storageClassName"] = checkpoint.storage_class_name
    return claim


def hccl_configmap_name(job: str) -> str:
    return f"{job}-hccl"


def render_hccl_configmap(ref: JobRef, table: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ref, hccl_configmap_name(ref.name)),
        "data": {"hccl.json": json.dumps(table, indent=2, sort_keys=True)},
    }


def render_pod_group(ref: JobRef, spec: LLMTrainJobSpec) -> dict[str, Any] | None:
    """The PodGroup an external gang scheduler needs, or None for builtin/none/kueue."""
    scheduler = spec.run_policy.gang_scheduler
    if scheduler == "volcano":
        group: dict[str, Any] = {
            "apiVersion": "scheduling.volcano.sh/v1beta1",
            "kind": "PodGroup",
            "metadata": _metadata(ref, ref.name),
            "spec": {"minMember": spec.nodes},
        }
        if spec.run_policy.queue_name:
            group["spec"]["queue"] = spec.run_policy.queue_name
        return group
    if scheduler == "coscheduling":
        return {
            "apiVersion": "scheduling.x-k8s.io/v1alpha1",
            "kind": "PodGroup",
            "metadata": _metadata(ref, ref.name),
            "spec": {
                "minMember": spec.nodes,
                "scheduleTimeoutSeconds": spec.failure_policy.gang_timeout_seconds,
            },
        }
    return None


def render_children(
    ref: JobRef,
    spec: LLMTrainJobSpec,
    pods_by_rank: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[dict[str, Any]]:
    """Every object of a job but its pods: the one list the operator applies each pass and
    `phalanx render` prints. The HCCL rank table is built from the current gang's pods (None
    or absent ranks leave it `initializing`)."""
    children = [
        render_service(ref, spec),
        render_checkpoint_claim(ref, spec),
        render_pod_group(ref, spec),
    ]
    if spec.backend() == "hccl":
        ranks = list(pods_by_rank) if pods_by_rank is not None else [None] * spec.nodes
        children.append(render_hccl_configmap(ref, rank_table(ranks, spec.accelerator.count())))
    return [child for child in children if child is not None]


def render_job_objects(
    obj: dict[str, Any], generation: int = 1, pod_security: PodSecurityLevel = DEFAULT_LEVEL
) -> list[dict[str, Any]]:
    """Everything a job manifest leads to in a namespace of level `pod_security`, for
    `phalanx render` and reviews."""
    from phalanx.api.trainjob import LLMTrainJob
    from phalanx.api.validate import parse

    job: LLMTrainJob = parse(obj, LLMTrainJob)
    meta = obj["metadata"]
    ref = JobRef(
        meta["name"], meta.get("namespace") or "default", meta.get("uid") or "<uid>", pod_security
    )
    return render_children(ref, job.spec) + render_pods(ref, job.spec, generation)
