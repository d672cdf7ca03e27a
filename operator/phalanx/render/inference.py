"""What an InferenceService should create: groups of server pods, a client Service selecting
ready leaders and a headless Service giving every pod a stable name. Pure: spec in, dicts out.

A replica is a group of `nodesPerReplica` pods (LeaderWorkerSet-style): worker 0 is the
leader, which the client Service routes to. Groups of more than one pod are created behind the
gang gate and placed whole by the admission loop; single-pod groups go to kube-scheduler.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from phalanx.api.inference import InferenceServiceSpec
from phalanx.constants import (
    GANG_GATE,
    INFERENCE_KIND,
    LABEL_GROUP_INDEX,
    LABEL_SERVICE,
    LABEL_WORKER_INDEX,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
)

from .owner import OwnerRef
from .pod import (
    accelerator_resources,
    accelerator_scheduling,
    apply_overlay,
    container_security,
    downward_api_env,
    pod_skeleton,
)

CONTAINER = "server"
LABEL_REVISION = "phalanx.dev/revision"
# Where the leader records its group's placement before the gate is lifted (crash safety).
ANNOTATION_PLACEMENT = "phalanx.dev/placement"
MODEL_DIR = "/models"
MODEL_VOLUME = "model"
CACHE_DIR = "/var/cache/phalanx"
SERVICE_PORT = 80
# Loading weights can take minutes; the startup probe allows for it instead of a fixed delay.
STARTUP_PERIOD_SECONDS = 10
STARTUP_FAILURE_THRESHOLD = 60
# In-flight requests get time to finish when a group is scaled down or replaced.
TERMINATION_GRACE_SECONDS = 60


class ServiceRef(OwnerRef):
    """Identity of the owning InferenceService: names, labels and the owner reference."""

    kind = INFERENCE_KIND


@dataclass(frozen=True)
class ModelMount:
    """A resolved model source: the server's --model argument and what to mount for it."""

    path: str
    revision: str
    claim: str | None = None


def pod_name(service: str, group: int, worker: int) -> str:
    return f"{service}-{group}-{worker}"


def peers_service_name(service: str) -> str:
    return f"{service}-peers"


def leader_address(service: str, namespace: str, group: int) -> str:
    """Stable DNS name of a group's leader: hostname + subdomain behind the headless Service."""
    return f"{pod_name(service, group, 0)}.{peers_service_name(service)}.{namespace}.svc"


def service_url(ref: ServiceRef) -> str:
    return f"http://{ref.name}.{ref.namespace}.svc/v1"


def leader_selector(service: str) -> dict[str, str]:
    return {LABEL_SERVICE: service, LABEL_WORKER_INDEX: "0"}


def selector_string(service: str) -> str:
    """status.selector for the scale subresource: HPA and KEDA read metrics of these pods."""
    return ",".join(f"{k}={v}" for k, v in leader_selector(service).items())


def service_labels(service: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "phalanx-server",
        "app.kubernetes.io/instance": service,
        "app.kubernetes.io/managed-by": "phalanx",
        "app.kubernetes.io/part-of": "phalanx",
        LABEL_SERVICE: service,
    }


def _metadata(ref: ServiceRef, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return ref.child_metadata(name, labels or service_labels(ref.name))


def template_revision(spec: InferenceServiceSpec, model: ModelMount) -> str:
    """The rollout key: a short hash of everything that shapes a pod, and the resolved model.

    Scaling fields are left out so that `kubectl scale` or the autoscaler never rolls pods.
    """
    shaping = spec.wire()
    for field in ("replicas", "autoscaling", "rollout"):
        shaping.pop(field, None)
    text = json.dumps({"spec": shaping, "model": [model.path, model.revision, model.claim]})
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def server_args(service: str, spec: InferenceServiceSpec, model: ModelMount) -> list[str]:
    """Flags of `phalanx-serve` (contract: docs/inference.md)."""
    s = spec.server
    args = [
        "--model", model.path,
        "--port", str(s.port),
        "--served-model-name", s.served_model_name or service,
        "--max-batch-size", str(s.max_batch_size),
        "--max-model-len", str(s.max_model_len),
        "--max-queue", str(s.max_queue),
        "--dtype", s.dtype,
    ]  # fmt: skip
    return [*args, *s.extra_args]


def group_env(
    ref: ServiceRef, spec: InferenceServiceSpec, group: int, worker: int
) -> list[dict[str, Any]]:
    """LeaderWorkerSet-style wiring first, then the downward API, then the user's additions."""
    ours = {
        "PHALANX_LEADER_ADDRESS": leader_address(ref.name, ref.namespace, group),
        "PHALANX_GROUP_SIZE": spec.nodes_per_replica,
        "PHALANX_WORKER_INDEX": worker,
        "PHALANX_CACHE_DIR": CACHE_DIR,
        # The server writes why it ended here (a model that cannot load), for the condition.
        TERMINATION_LOG_ENV: TERMINATION_LOG,
    }
    return [
        *({"name": name, "value": str(value)} for name, value in ours.items()),
        *downward_api_env(),
        *(e.wire() for e in spec.env),
    ]


def _probes(port: int) -> dict[str, Any]:
    def health(period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/health", "port": port},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    return {
        "startupProbe": health(STARTUP_PERIOD_SECONDS, STARTUP_FAILURE_THRESHOLD),
        "readinessProbe": health(5, 3),
        "livenessProbe": health(10, 6),
    }


def _volumes(model: ModelMount) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        # Tensor-parallel peers and torch use shared memory beyond the container default.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_DIR},
    ]
    if model.claim:
        volumes.append(
            {
                "name": MODEL_VOLUME,
                "persistentVolumeClaim": {"claimName": model.claim, "readOnly": True},
            }
        )
        mounts.append({"name": MODEL_VOLUME, "mountPath": MODEL_DIR, "readOnly": True})
    return volumes, mounts


def _scheduling(spec: InferenceServiceSpec) -> dict[str, Any]:
    pod: dict[str, Any] = {}
    if spec.nodes_per_replica > 1:
        pod["schedulingGates"] = [{"name": GANG_GATE}]
    return {**pod, **accelerator_scheduling(spec.accelerator)}


def group_labels(service: str, group: int, worker: int, revision: str) -> dict[str, str]:
    return {
        **service_labels(service),
        LABEL_GROUP_INDEX: str(group),
        LABEL_WORKER_INDEX: str(worker),
        LABEL_REVISION: revision,
    }


def render_group_pod(
    ref: ServiceRef,
    spec: InferenceServiceSpec,
    model: ModelMount,
    group: int,
    worker: int,
    revision: str,
) -> dict[str, Any]:
    """Pod `worker` of group `group` at `revision` (gated when the group is a gang)."""
    labels = group_labels(ref.name, group, worker, revision)
    volumes, mounts = _volumes(model)
    port = spec.server.port
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["phalanx-serve"],
        "args": server_args(ref.name, spec, model),
        "env": group_env(ref, spec, group, worker),
        "ports": [{"name": "http", "containerPort": port}],
        "resources": accelerator_resources(spec.accelerator),
        "volumeMounts": mounts,
        **_probes(port),
        "securityContext": container_security(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    name = pod_name(ref.name, group, worker)
    pod = pod_skeleton(
        _metadata(ref, name, labels),
        hostname=name,
        subdomain=peers_service_name(ref.name),
        # The kubelet restarts a crashed server in place; a group of several pods is
        # recreated as a whole by the controller instead (see plan.groups).
        restart_policy="Always",
        grace_seconds=TERMINATION_GRACE_SECONDS,
        container=container,
        volumes=volumes,
        scheduling=_scheduling(spec),
    )
    return apply_overlay(pod, spec.pod_template, labels, ref.pod_security)


def render_group(
    ref: ServiceRef, spec: InferenceServiceSpec, model: ModelMount, group: int, revision: str
) -> list[dict[str, Any]]:
    return [
        render_group_pod(ref, spec, model, group, worker, revision)
        for worker in range(spec.nodes_per_replica)
    ]


def render_client_service(ref: ServiceRef, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The Service clients call: ready leaders only (Endpoints skip pods failing readiness)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, ref.name),
        "spec": {
            "selector": leader_selector(ref.name),
            "ports": [
                {
                    "name": "http",
                    "port": SERVICE_PORT,
                    "targetPort": spec.server.port,
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_peers_service(ref: ServiceRef, spec: InferenceServiceSpec) -> dict[str, Any]:
    """Headless Service giving every pod a DNS name, ready or not (workers find the leader first)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, peers_service_name(ref.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_SERVICE: ref.name},
            "ports": [{"name": "http", "port": spec.server.port}],
        },
    }
