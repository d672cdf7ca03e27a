"""Identity of an owning custom object, shared by every renderer of its children."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from phalanx.api.pod_security import DEFAULT_LEVEL, PodSecurityLevel
from phalanx.constants import API_VERSION


@dataclass(frozen=True)
class OwnerRef:
    """Name, namespace and uid of the owner, and the pod security level of its namespace
    (what its pods are rendered for); subclasses fix its kind."""

    kind: ClassVar[str] = ""
    name: str
    namespace: str
    uid: str
    pod_security: PodSecurityLevel = DEFAULT_LEVEL

    def owner_reference(self) -> dict[str, Any]:
        # A controller reference: deleting the owner cascades to the child.
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def child_metadata(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": labels,
            "ownerReferences": [self.owner_reference()],
        }
