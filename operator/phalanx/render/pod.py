"""The pod skeleton every Phalanx pod shares: security contexts, accelerator resources and
tolerations, the downward-API env, and the user's overlay (which cannot move a pod out of the
gang or group it belongs to). Pure: the kind-specific renderers fill in the container."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from phalanx.api.common import Accelerator, PodTemplateOverlay

from .overlay import merge

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# Our images run as this unprivileged user; fsGroup lets it write the checkpoint volume.
RUN_AS = 1000


def container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


def pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def accelerator_resources(accelerator: Accelerator) -> dict[str, Any]:
    """Requests and limits of one pod: devices (requests = limits), cpu, memory."""
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    name = accelerator.resource_name()
    if name:
        requests[name] = limits[name] = str(accelerator.per_node)
    if accelerator.cpu is not None:
        requests["cpu"] = str(accelerator.cpu)
    if accelerator.memory is not None:
        requests["memory"] = limits["memory"] = str(accelerator.memory)
    return {"requests": requests, "limits": limits}


def accelerator_scheduling(accelerator: Accelerator) -> dict[str, Any]:
    """Node selector for a device product, and the toleration accelerator nodes need."""
    pod: dict[str, Any] = {}
    if accelerator.product:
        pod["nodeSelector"] = {GPU_PRODUCT_LABEL: accelerator.product}
    if accelerator.resource_name():
        # Accelerator nodes are commonly tainted with their resource name.
        pod["tolerations"] = [
            {"key": accelerator.resource_name(), "operator": "Exists", "effect": "NoSchedule"}
        ]
    return pod


def downward_api_env() -> list[dict[str, Any]]:
    fields = {"POD_NAME": "metadata.name", "POD_IP": "status.podIP", "NODE_NAME": "spec.nodeName"}
    return [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}} for n, p in fields.items()]


def pod_skeleton(
    metadata: dict[str, Any],
    *,
    hostname: str,
    subdomain: str,
    restart_policy: str,
    grace_seconds: int,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    scheduling: Mapping[str, Any],
) -> dict[str, Any]:
    """A pod with one container, stable DNS (hostname + subdomain) and our security defaults."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "hostname": hostname,
            "subdomain": subdomain,
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": grace_seconds,
            "enableServiceLinks": False,
            "securityContext": pod_security(),
            "containers": [container],
            "volumes": volumes,
            **scheduling,
        },
    }


def apply_overlay(
    pod: dict[str, Any], overlay: PodTemplateOverlay | None, pinned: Mapping[str, str]
) -> dict[str, Any]:
    """The user's partial pod template merged in; the `pinned` labels are restored afterwards,
    so an overlay cannot detach a pod from its gang, group or revision."""
    if overlay is None:
        return pod
    pod["metadata"] = merge(pod["metadata"], overlay.metadata.wire())
    pod["spec"] = merge(pod["spec"], overlay.spec)
    pod["metadata"]["labels"].update(pinned)
    return pod
