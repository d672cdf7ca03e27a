"""Hot spares: whole nodes per topology domain kept free of ordinary gangs for recovery.

A spare policy (``rack=1``: one node per rack) names a topology level and how many nodes of
each of its domains ordinary admission must leave untouched. Spares are not idle: preemptible
work (a filler) may run on them, and a gang recovering from lost nodes takes them first, in
the domain it ran in, preempting the filler. Which nodes are the spares is recomputed on every
admission pass from the snapshot, so a node that fails or returns changes the choice at once.

Everything here is a pure function of snapshots; the admission loop builds the snapshots
(``free``: what is free now; ``reclaimable``: what would be free without the fillers) and
deletes the fillers a recovery displaced.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from phalanx.placement.gang import GangRequest, Placement
from phalanx.placement.place import domains, place_gang
from phalanx.placement.snapshot import CapacitySnapshot, pod_demand, slots_on
from phalanx.placement.topology import CLUSTER, HOST, Topology

# The environment variable (and chart value operator.spares) holding the operator's policy.
SPARES_ENV = "PHALANX_SPARES"
_POLICY = re.compile(r"([a-z][a-z0-9-]*)=([0-9]+)")
# A node label or pod label a workload uses to say it may be preempted from spares.
PREEMPTIBLE_VALUE = "true"


@dataclass(frozen=True)
class SparePolicy:
    """``count`` whole nodes of every domain of ``level`` kept for recovery."""

    level: str
    count: int

    def __str__(self) -> str:
        return f"{self.level}={self.count}"

    @classmethod
    def parse(cls, text: str, topology: Topology) -> SparePolicy | None:
        """``level=count`` (``rack=1``); empty or ``none`` is no policy. A bad value raises
        ValueError naming the setting, so the operator refuses to start rather than ignore it."""
        text = text.strip()
        if text in ("", "none", "0"):
            return None
        match = _POLICY.fullmatch(text)
        if match is None:
            raise ValueError(
                f"{SPARES_ENV}={text!r}: expected level=count, e.g. rack=1 (count whole nodes "
                "kept free per domain of that topology level)"
            )
        level, count = match.group(1), int(match.group(2))
        if level == HOST or not topology.has_level(level):
            known = ", ".join([*(n for n in topology.names if n != HOST), CLUSTER])
            raise ValueError(
                f"{SPARES_ENV}={text!r}: level {level!r} is not a domain level of the "
                f"operator's topology ({known})"
            )
        if count > 1000:
            raise ValueError(f"{SPARES_ENV}={text!r}: count {count} is above the limit of 1000")
        return None if count == 0 else cls(level, count)


@dataclass(frozen=True)
class Spares:
    """What one admission pass knows about spares.

    ``reserved``: nodes ordinary gangs may not use (the policy's spares, the room kept for
    running gangs' own spares, and the nodes of gangs waiting to be recovered); ``policy`` is
    None when only gangs' own spares (failurePolicy.spares) are kept. ``reclaimable``: free capacity with the fillers' pods counted as free,
    which only a recovering gang may place on.
    """

    policy: SparePolicy | None
    reserved: frozenset[str]
    reclaimable: CapacitySnapshot


def untouched(baseline: CapacitySnapshot, reclaimable: CapacitySnapshot) -> frozenset[str]:
    """Nodes that hold no pod of ordinary work: their free capacity, fillers not counted, is
    what ``baseline`` (the same nodes with only their per-node daemons) leaves them."""
    return frozenset(
        node.name
        for node in reclaimable.nodes
        if node.name in baseline and dict(node.free) == dict(baseline.node(node.name).free)
    )


def spare_nodes(
    reclaimable: CapacitySnapshot,
    candidates: frozenset[str],
    filled: frozenset[str],
    policy: SparePolicy,
    topology: Topology,
) -> frozenset[str]:
    """``policy.count`` spare nodes of every domain of the policy's level, chosen among
    ``candidates`` (nodes free of ordinary work).

    Nodes already running a filler are chosen first, so ordinary gangs take truly empty nodes
    and nothing is preempted for them; then the last by name, so the choice is stable while
    gangs fill domains from their first nodes. A domain with fewer candidates keeps all of
    them: it is full for ordinary gangs until one leaves.
    """
    chosen: set[str] = set()
    for members in domains(reclaimable.nodes, policy.level, topology).values():
        free = [node.name for node in members if node.name in candidates]
        free.sort(key=lambda name: (name in filled, name), reverse=True)
        chosen.update(free[: policy.count])
    return frozenset(chosen)


def reserve_of_total(
    total: CapacitySnapshot, policy: SparePolicy, topology: Topology
) -> frozenset[str]:
    """The spares of the empty cluster: what ordinary gangs can never use, for judging
    "never fits" (a rack-sized gang never fits a rack that keeps one node spare)."""
    everything = frozenset(node.name for node in total.nodes)
    return spare_nodes(total, everything, frozenset(), policy, topology)


def domain_of(
    snapshot: CapacitySnapshot, level: str, domain: str, topology: Topology
) -> CapacitySnapshot:
    """The snapshot cut down to one domain (of a level the topology knows; else empty)."""
    if level != CLUSTER and level != HOST and not topology.has_level(level):
        return CapacitySnapshot()
    members = domains(snapshot.nodes, level, topology).get(domain, [])
    keep = {node.name for node in members}
    return snapshot.without(node.name for node in snapshot.nodes if node.name not in keep)


def recovery_domain(
    level: str,
    domain: str,
    nodes: Sequence[str],
    labels: Mapping[str, Mapping[str, str]],
    policy: SparePolicy | None,
    topology: Topology,
) -> tuple[str, str]:
    """Where a gang that ran in ``domain`` of ``level`` on ``nodes`` is recovered: that domain
    when it is as coarse as the policy's level, else the policy-level domain around its nodes
    (a one-node gang's host is lost with it; its rack's spare is the replacement). ``labels``
    are the node labels still known (a lost node is usually still listed)."""
    if policy is None:
        return level, domain  # the gang's own spares are in its own domain
    if level == CLUSTER or policy.level == CLUSTER:
        return (CLUSTER, CLUSTER) if policy.level == CLUSTER else (level, domain)
    finer = level == HOST or (
        topology.has_level(level) and topology.is_coarser(policy.level, level)
    )
    if not finer:
        return level, domain
    label = topology.label(policy.level)
    around = {labels.get(node, {}).get(label) for node in nodes} - {None, ""}
    if len(around) == 1:
        return policy.level, str(around.pop())
    return level, domain


def place_recovery(
    reclaimable: CapacitySnapshot,
    request: GangRequest,
    topology: Topology,
) -> Placement | None:
    """A recovering gang's replacement inside the domain it ran in (``request.recover``), on
    capacity that is free or held only by fillers; None when even that does not hold it."""
    if request.recover is None:
        return None
    level, domain = request.recover
    inside = domain_of(reclaimable, level, domain, topology)
    if not inside.nodes:
        return None
    result = place_gang(inside, request, topology)
    return result if isinstance(result, Placement) else None


def displaced(
    placement: Placement, free: CapacitySnapshot, per_pod: Mapping[str, int]
) -> tuple[str, ...]:
    """Nodes of a recovery placement that lack room now: their fillers must be preempted."""
    demand = pod_demand(per_pod)
    counts: dict[str, int] = {}
    for name in placement.nodes:
        counts[name] = counts.get(name, 0) + 1
    short = []
    for name, count in counts.items():
        if name not in free or slots_on(free.node(name).free, demand, count) < count:
            short.append(name)
    return tuple(sorted(short))


def is_preemptible_pod(pod: Mapping[str, object], label: str) -> bool:
    """A pod that may be preempted from spares: labelled ``label: "true"``, or of a priority
    below zero (the band below every default, where best-effort work runs)."""
    metadata = pod.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, Mapping) else None
    if isinstance(labels, Mapping) and labels.get(label) == PREEMPTIBLE_VALUE:
        return True
    spec = pod.get("spec")
    priority = spec.get("priority") if isinstance(spec, Mapping) else None
    return isinstance(priority, int) and priority < 0
