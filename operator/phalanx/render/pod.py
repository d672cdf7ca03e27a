"""The pod skeleton every Phalanx pod shares: security contexts, accelerator resources and
tolerations, the downward-API env, and the user's overlay (which cannot move a pod out of the
gang or group it belongs to). Pure: the kind-specific renderers fill in the container."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from phalanx.api.common import RESTRICTED_VOLUME_SOURCES, Accelerator, PodTemplateOverlay
from phalanx.api.pod_security import (
    DEFAULT_LEVEL,
    VOLUME_LEVELS,
    PodSecurityLevel,
    capability_level,
    permits,
)
from phalanx.constants import GANG_GATE, RESERVED_ENV

from .overlay import merge

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# A node's name, not its kubernetes.io/hostname label: the two differ on some providers.
NODE_NAME_FIELD = "metadata.name"
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
            # Workloads do not call the Kubernetes API; a template may ask for the token.
            "automountServiceAccountToken": False,
            "securityContext": pod_security(),
            "containers": [container],
            "volumes": volumes,
            **scheduling,
        },
    }


def apply_overlay(
    pod: dict[str, Any],
    overlay: PodTemplateOverlay | None,
    pinned: Mapping[str, str],
    level: PodSecurityLevel = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """The user's partial pod template merged in, then the pod's invariants put back.

    The API admits only the allow-listed fields (`PodSpecOverlay`); the renderer re-imposes
    the rest anyway, so an object stored before the allow-list, or one a client sent with
    field validation off, still cannot detach a pod from its gang, group or revision, change
    its service account or Phalanx's env, or go beyond the namespace's pod security `level`
    (root, host network, privileges, capabilities, host paths). The operator refuses such a
    template before rendering (`api.pod_security.refused`); this is the second line.
    """
    if overlay is None:
        return pod
    merged = dict(pod)
    merged["metadata"] = merge(pod["metadata"], _written(overlay.metadata))
    merged["spec"] = merge(pod["spec"], _written(overlay.spec))
    return enforce_invariants(merged, pod, pinned, level)


def _written(model: PodTemplateOverlay | Any) -> dict[str, Any]:
    """Only what the user wrote: defaults of the overlay's fields must not clear the pod's."""
    written: dict[str, Any] = model.model_dump(
        by_alias=True, exclude_unset=True, exclude_none=True, mode="json"
    )
    return written


# PodSpec fields an overlay may change; every other field is the rendered one.
OVERLAY_SPEC_FIELDS = frozenset(
    {
        "nodeSelector",
        "tolerations",
        "affinity",
        "topologySpreadConstraints",
        "volumes",
        "imagePullSecrets",
        "automountServiceAccountToken",
        "securityContext",
        "containers",
        "hostNetwork",
    }
)
OVERLAY_POD_SECURITY = ("runAsUser", "runAsGroup", "fsGroup", "supplementalGroups")
OVERLAY_CONTAINER_FIELDS = ("env", "resources", "volumeMounts", "securityContext")


def enforce_invariants(
    merged: dict[str, Any],
    rendered: Mapping[str, Any],
    pinned: Mapping[str, str],
    level: PodSecurityLevel = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """`merged` with everything outside the overlay's allow-list, and everything beyond
    the pod security `level`, as in `rendered`."""
    meta = dict(merged["metadata"])
    meta["labels"] = {**meta.get("labels", {}), **pinned}
    ours = rendered["metadata"].get("annotations") or {}
    if ours:
        meta["annotations"] = {**meta.get("annotations", {}), **ours}
    base: Mapping[str, Any] = rendered["spec"]
    got: Mapping[str, Any] = merged["spec"]
    spec: dict[str, Any] = {k: v for k, v in base.items() if k not in OVERLAY_SPEC_FIELDS}
    for key in OVERLAY_SPEC_FIELDS - {"securityContext", "containers", "volumes", "hostNetwork"}:
        if key in got:
            spec[key] = got[key]
    if "nodeSelector" in base:
        spec["nodeSelector"] = {**got.get("nodeSelector", {}), **base["nodeSelector"]}
    if got.get("hostNetwork") is True and permits(level, "privileged"):
        spec["hostNetwork"] = True
        # Rank and leader addresses are cluster DNS names, which a host-network pod resolves
        # only with this policy.
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    asked = {
        k: v for k, v in (got.get("securityContext") or {}).items() if k in OVERLAY_POD_SECURITY
    }
    root = asked.get("runAsUser") == 0 and permits(level, "baseline")
    if not (isinstance(asked.get("runAsUser"), int) and (asked["runAsUser"] > 0 or root)):
        asked.pop("runAsUser", None)  # `restricted` never runs as root
    spec["securityContext"] = {**base["securityContext"], **asked}
    if root:
        # The kubelet refuses to start a root container that promises to run as non-root.
        spec["securityContext"]["runAsNonRoot"] = False
    spec["containers"] = [
        _container(
            next((c for c in got["containers"] if c.get("name") == c0["name"]), c0),
            c0,
            level,
            root,
        )
        for c0 in base["containers"]
    ]
    spec["volumes"] = _volumes(got.get("volumes") or [], base.get("volumes") or [], level)
    return {**merged, "metadata": meta, "spec": dict(sorted_like(spec, base))}


def _container_security(
    got: Mapping[str, Any], base: Mapping[str, Any], level: PodSecurityLevel, root: bool
) -> dict[str, Any]:
    """The rendered security context, loosened only as far as the template asks and `level`
    allows (the template's `ContainerSecurityOverlay`)."""
    security = dict(base)
    added = [
        name
        for name in ((got.get("capabilities") or {}).get("add") or [])
        if isinstance(name, str) and permits(level, capability_level(name))
    ]
    if added:
        security["capabilities"] = {**security["capabilities"], "add": added}
    privileged = got.get("privileged") is True and permits(level, "privileged")
    if privileged:
        security["privileged"] = True
    # The API refuses allowPrivilegeEscalation false beside privileged or CAP_SYS_ADMIN.
    if (
        (got.get("allowPrivilegeEscalation") is True and permits(level, "baseline"))
        or privileged
        or {"SYS_ADMIN", "CAP_SYS_ADMIN"} & set(added)
    ):
        security["allowPrivilegeEscalation"] = True
    if root:
        security["runAsNonRoot"] = False
    return security


def _container(
    got: Mapping[str, Any],
    base: Mapping[str, Any],
    level: PodSecurityLevel = DEFAULT_LEVEL,
    root: bool = False,
) -> dict[str, Any]:
    container = dict(base)
    if "securityContext" in base:
        container["securityContext"] = _container_security(
            got.get("securityContext") or {}, base["securityContext"], level, root
        )
    reserved = {e["name"]: e for e in base.get("env") or [] if e["name"] in RESERVED_ENV}
    if "env" in got:
        container["env"] = [reserved.get(e.get("name"), e) for e in got["env"]]
    if "volumeMounts" in got:
        container["volumeMounts"] = got["volumeMounts"]
    if "resources" in got:
        resources = got["resources"]
        container["resources"] = {
            part: {**(resources.get(part) or {}), **(base["resources"].get(part) or {})}
            for part in ("requests", "limits")
        }
    return container


def _volumes(got: list[Any], base: list[Any], level: PodSecurityLevel) -> list[Any]:
    """Rendered volumes as rendered; added ones only of the kinds `level` allows."""
    allowed = {
        *RESTRICTED_VOLUME_SOURCES,
        *(kind for kind, needed in VOLUME_LEVELS.items() if permits(level, needed)),
    }
    ours = {v["name"]: v for v in base}
    kept = []
    for volume in got:
        name = volume.get("name")
        if name in ours:
            kept.append(ours[name])
        elif [k for k in volume if k != "name"] and all(
            k in allowed for k in volume if k != "name"
        ):
            kept.append(volume)
    return kept


def sorted_like(spec: dict[str, Any], base: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The rendered order first (stable golden files), then the overlay's additions."""
    order = {key: i for i, key in enumerate(base)}
    return sorted(spec.items(), key=lambda item: order.get(item[0], len(order)))


def node_pin(node: str) -> dict[str, Any]:
    return {"key": NODE_NAME_FIELD, "operator": "In", "values": [node]}


def bound_to(pod: dict[str, Any], node: str) -> dict[str, Any]:
    """`pod` created already bound to `node` (`spec.nodeName`), without the gang gate: one
    API write instead of a gated create, the ungate patch and kube-scheduler's binding."""
    spec = pod.setdefault("spec", {})
    spec["nodeName"] = node
    gates = [g for g in spec.get("schedulingGates") or [] if g.get("name") != GANG_GATE]
    if gates:
        spec["schedulingGates"] = gates
    else:
        spec.pop("schedulingGates", None)
    return pod


def pin_patch(pod: Mapping[str, Any], node: str) -> dict[str, Any]:
    """The merge patch that pins a gated pod to `node` and lifts the gang gate.

    The pin is a required node-affinity `matchFields` on `metadata.name`, added to every
    required term the pod already has (terms are ORed, so each must carry it); a gated pod's
    affinity may be narrowed this way (pod scheduling readiness). Patching twice is harmless.
    """
    spec = pod.get("spec") or {}
    affinity = copy.deepcopy(spec.get("affinity") or {})
    required = affinity.setdefault("nodeAffinity", {}).setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {}
    )
    pin = node_pin(node)
    terms = required.get("nodeSelectorTerms") or [{}]
    required["nodeSelectorTerms"] = [
        term
        if pin in (term.get("matchFields") or [])
        else {**term, "matchFields": [*(term.get("matchFields") or []), pin]}
        for term in terms
    ]
    gates = [g for g in spec.get("schedulingGates") or [] if g.get("name") != GANG_GATE]
    return {"spec": {"affinity": affinity, "schedulingGates": gates or None}}
