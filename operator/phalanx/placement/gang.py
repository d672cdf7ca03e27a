"""What a gang asks for and the two answers placement can give: a Placement or an Unplaceable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from phalanx.constants import Reason
from phalanx.placement.filters import PodConstraints


@dataclass(frozen=True)
class GangRequest:
    """A gang of ``pods`` identical pods that must all start together.

    ``per_pod`` uses placement units (cpu in millicores, memory in bytes, devices as counts).
    ``required`` confines the gang to one domain of that level or a finer one. Placement always
    tries the finest level first; ``preferred`` names the level the gang waits up to
    ``preferred_wait`` seconds (since ``created``) for, before it is spread wider
    (``placement.preferred``). ``constraints`` are the pods' own node selector, required node
    affinity and tolerations: a node kube-scheduler would refuse them is never chosen.
    ``avoid_nodes`` are nodes the gang's earlier pods failed on; they are not used while
    other capacity exists, and they still count as capacity when judging "never fits".
    ``preemptible`` gangs may run on spare nodes (`placement.spares`) and yield them to a
    recovery; ``recover`` is the (level, domain) a gang recovering from failures ran in, where
    its replacement looks first. ``spares`` more pods' room is kept beside the gang, in its
    domain, for its own recovery. A blocked gang ``holds`` the domain it waits on against gangs
    behind it (`placement.queue`); the admission loop clears it for a gang that waits on
    capacity nobody is known to release, so it never idles nodes for an unknown time.
    """

    key: str
    pods: int
    per_pod: Mapping[str, int] = field(default_factory=dict)
    required: str | None = None
    preferred: str | None = None
    priority: int = 0
    created: float = 0.0
    preferred_wait: float = 0.0
    avoid_nodes: frozenset[str] = frozenset()
    constraints: PodConstraints = field(default_factory=PodConstraints)
    preemptible: bool = False
    recover: tuple[str, str] | None = None
    spares: int = 0  # room for this many more pods kept free in its domain (its own spares)
    holds: bool = True

    def __post_init__(self) -> None:
        if self.pods < 1:
            raise ValueError(f"gang {self.key!r} needs at least one pod, got {self.pods}")
        negative = sorted(resource for resource, amount in self.per_pod.items() if amount < 0)
        if negative:
            raise ValueError(f"gang {self.key!r} requests negative {', '.join(negative)}")
        object.__setattr__(self, "per_pod", MappingProxyType(dict(self.per_pod)))
        object.__setattr__(self, "avoid_nodes", frozenset(self.avoid_nodes))

    def __hash__(self) -> int:
        return hash(self.key)


@dataclass(frozen=True)
class Placement:
    """Where a whole gang goes: ``nodes[i]`` runs rank ``i``, all inside ``domain`` of ``level``."""

    level: str
    domain: str
    nodes: tuple[str, ...]
    # A recovery placed inside the domain it ran in, and the nodes whose preemptible filler
    # must leave first.
    recovered: bool = False
    displaced: tuple[str, ...] = ()
    # The room kept for the gang's own spares (GangRequest.spares), one node per spare pod.
    spare_nodes: tuple[str, ...] = ()


# Reasons, PascalCase as they appear in the Admitted condition.
UNKNOWN_LEVEL = Reason.UNKNOWN_TOPOLOGY_LEVEL
POD_EXCEEDS_NODE = Reason.POD_EXCEEDS_NODE_CAPACITY
GANG_EXCEEDS_DOMAIN = Reason.GANG_EXCEEDS_DOMAIN_CAPACITY
INSUFFICIENT_CAPACITY = Reason.INSUFFICIENT_CAPACITY
QUEUED_BEHIND = Reason.QUEUED_BEHIND_HIGHER_PRIORITY


@dataclass(frozen=True)
class Unplaceable:
    """Why a gang was not placed.

    ``permanent`` means it would not fit even in this cluster emptied of every pod, so waiting
    cannot help; otherwise it may fit once capacity frees up.
    """

    reason: str
    message: str
    permanent: bool
