"""Pod security levels: what a pod template may ask for in a namespace of each level.

The levels are the Kubernetes Pod Security Standards' (restricted < baseline < privileged).
A namespace's `phalanx.dev/pod-security` label, which only those who may label namespaces
can set, names the level Phalanx renders that namespace's workload pods for; without it the
level is `restricted`. The API admits every typed template field (CEL cannot see the
namespace), so the operator and `phalanx validate --pod-security` refuse, with the same
words, a template whose fields need more than the namespace's level. Pure: no client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from phalanx.constants import POD_SECURITY_LABEL, POD_SECURITY_LEVELS

from .common import PodTemplateOverlay

PodSecurityLevel = Literal["restricted", "baseline", "privileged"]
DEFAULT_LEVEL: PodSecurityLevel = "restricted"

# Capabilities a container may add at each level (Pod Security Standards, "Capabilities");
# any other (IPC_LOCK, SYS_RESOURCE, NET_ADMIN, SYS_ADMIN, ALL, a CAP_-prefixed spelling)
# needs `privileged`.
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
BASELINE_CAPABILITIES = RESTRICTED_CAPABILITIES | {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
# Volume kinds of the template beyond `restricted`'s, and the level each needs.
VOLUME_LEVELS: dict[str, PodSecurityLevel] = {"nfs": "baseline", "hostPath": "privileged"}


def level_of(labels: Mapping[str, str] | None) -> PodSecurityLevel:
    """A namespace's level from its labels; absent or unknown values are `restricted` (an
    unknown value never widens what pods may do)."""
    value = (labels or {}).get(POD_SECURITY_LABEL, DEFAULT_LEVEL)
    for level in ("restricted", "baseline", "privileged"):
        if value == level:
            return level
    return DEFAULT_LEVEL


def permits(level: str, needed: str) -> bool:
    return POD_SECURITY_LEVELS.index(level) >= POD_SECURITY_LEVELS.index(needed)


def capability_level(name: str) -> PodSecurityLevel:
    if name in RESTRICTED_CAPABILITIES:
        return "restricted"
    return "baseline" if name in BASELINE_CAPABILITIES else "privileged"


@dataclass(frozen=True)
class Requirement:
    """One template field that needs more than `restricted`: where, which level, and why."""

    field: str
    level: PodSecurityLevel
    why: str

    def refusal(self, allowed: str) -> str:
        return (
            f"{self.field}: {self.why} needs pod security level {self.level}, and the "
            f"namespace allows {allowed}; a cluster admin can label the namespace "
            f"{POD_SECURITY_LABEL}={self.level}, or remove the field"
        )


def requirements(template: PodTemplateOverlay | None, prefix: str) -> list[Requirement]:
    """Every field of `template` (at `prefix`, e.g. spec.podTemplate) beyond `restricted`."""
    if template is None:
        return []
    spec = template.spec
    at = f"{prefix}.spec"
    found: list[Requirement] = []
    if spec.security_context is not None and spec.security_context.run_as_user == 0:
        found.append(Requirement(f"{at}.securityContext.runAsUser", "baseline", "running as root"))
    if spec.host_network:
        found.append(Requirement(f"{at}.hostNetwork", "privileged", "sharing the node's network"))
    for i, volume in enumerate(spec.volumes):
        for kind, level in VOLUME_LEVELS.items():
            if getattr(volume, "host_path" if kind == "hostPath" else kind) is not None:
                found.append(Requirement(f"{at}.volumes[{i}].{kind}", level, f"a {kind} volume"))
    for i, container in enumerate(getattr(spec, "containers", None) or []):
        security = container.security_context
        if security is None:
            continue
        where = f"{at}.containers[{i}].securityContext"
        if security.privileged:
            found.append(Requirement(f"{where}.privileged", "privileged", "a privileged container"))
        if security.allow_privilege_escalation:
            found.append(
                Requirement(f"{where}.allowPrivilegeEscalation", "baseline", "privilege escalation")
            )
        for j, name in enumerate(security.capabilities.add if security.capabilities else []):
            level = capability_level(name)
            if level != "restricted":
                found.append(
                    Requirement(f"{where}.capabilities.add[{j}]", level, f"the capability {name}")
                )
    return found


def refused(
    template: PodTemplateOverlay | None, level: str, prefix: str = "spec.podTemplate"
) -> list[Requirement]:
    """The template's fields that `level` does not permit (empty: the pods may be rendered)."""
    return [r for r in requirements(template, prefix) if not permits(level, r.level)]


def refusal_message(namespace: str, level: str, refusals: list[Requirement]) -> str:
    """The condition's message: the namespace, its level, and each field with its remedy."""
    return (
        f"Namespace {namespace} is at pod security level {level} (label {POD_SECURITY_LABEL}): "
        + "; ".join(r.refusal(level) for r in refusals)
        + ". No pods were created."
    )
