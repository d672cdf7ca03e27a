"""The nodes one gang may use on one snapshot, counted for its pods' shape: the groundwork shared
by placing a gang, explaining why it does not fit, and choosing the domain it waits on.

A `Pool` is built once per snapshot and gang shape (memoized on the snapshot) from the
snapshot's per-node columns: which nodes kube-scheduler would bind the pods to (`eligible`), how
many of its pods fit on each (capped at the gang size, as `slots_on` counts them) and how much of
the gang's dominant resource each has free. Per topology level it sums those per domain once,
over the snapshot's label index, so no level regroups the nodes.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

from phalanx.placement.filters import PodConstraints
from phalanx.placement.gang import GangRequest
from phalanx.placement.snapshot import PODS, CapacitySnapshot, Derived, NodeInfo, pod_demand
from phalanx.placement.topology import CLUSTER, HOST, Topology

_UNCONSTRAINED = PodConstraints()


class Domain(NamedTuple):
    """One domain of a level as a gang sees it: its nodes the gang may use (positions in the
    snapshot, in node order), how many of its pods they hold and their free dominant resource."""

    name: str
    members: tuple[int, ...]
    slots: int
    dominant_free: int


@dataclass(frozen=True)
class Pool(Derived):
    """The nodes a gang may use on ``snapshot``; per-node columns are in node order and zero
    on the nodes it may not use."""

    snapshot: CapacitySnapshot
    topology: Topology
    pods: int
    demand: Mapping[str, int]
    eligible: tuple[int, ...]
    excluded: frozenset[int]
    slots: tuple[int, ...]
    dominant: str
    dominant_free: tuple[int, ...]
    # Per level, its domains by name; counted on first use.
    _domains: dict[str, dict[str, Domain]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def nodes(self, positions: Iterable[int]) -> list[NodeInfo]:
        return [self.snapshot.nodes[i] for i in positions]

    def domains(self, level: str) -> Collection[Domain]:
        """The domains of ``level`` holding at least one node the gang may use, as
        `place.domains` groups those nodes: every node at ``host``, one domain at ``cluster``."""
        found = self._domains.get(level)
        if found is None:
            found = self._domains[level] = self._group(level)
        return found.values()

    def best(self, level: str) -> Domain | None:
        """The best fit among the domains of ``level`` that hold the whole gang: least of the
        dominant resource left over, then fewest spare slots, then name."""
        slots, free, pods = self.slots, self.dominant_free, self.pods
        if level == HOST and level not in self._domains:
            # Every node is a domain: choose among positions, then build the one chosen.
            nodes = self.snapshot.nodes
            fitting = [i for i in self.eligible if slots[i] >= pods]
            if not fitting:
                return None
            i = min(fitting, key=lambda i: (free[i], slots[i], nodes[i].name))
            return Domain(nodes[i].name, (i,), slots[i], free[i])
        candidates = [domain for domain in self.domains(level) if domain.slots >= pods]
        if not candidates:
            return None
        return min(candidates, key=lambda d: (d.dominant_free, d.slots, d.name))

    def reserved(self, child: CapacitySnapshot, touched: Sequence[int]) -> Pool | None:
        """The pool on ``child``, this snapshot less the pods just reserved on the nodes at
        ``touched``: which nodes the gang may use is unchanged (labels, taints and the cordon
        are), so only those nodes and the domains holding them are counted again."""
        excluded, pods = self.excluded, self.pods
        dominant = _dominant(child, self.demand, pods, excluded)
        if dominant != self.dominant:
            return None
        changed = [i for i in touched if i not in excluded]
        capacity, amounts = child.slot_column(self.demand), child.free_column(dominant)
        slots, free = list(self.slots), list(self.dominant_free)
        for i in changed:
            slots[i] = capacity[i] if capacity[i] < pods else pods
            free[i] = amounts[i]
        pool = Pool(
            child,
            self.topology,
            pods,
            self.demand,
            self.eligible,
            excluded,
            tuple(slots),
            dominant,
            tuple(free),
        )
        nodes = child.nodes
        for level, domains in self._domains.items():
            if level == CLUSTER:
                names: set[str | None] = {CLUSTER}
            elif level == HOST:
                names = {nodes[i].name for i in changed}
            else:
                label = self.topology.label(level)
                names = {nodes[i].labels.get(label) for i in changed}
            recounted = dict(domains)
            for name in names:
                if name in recounted:
                    recounted[name] = pool._count(name, recounted[name].members)
            pool._domains[level] = recounted
        return pool

    def _count(self, name: str, members: tuple[int, ...]) -> Domain:
        slots = sum(map(self.slots.__getitem__, members))
        return Domain(name, members, slots, sum(map(self.dominant_free.__getitem__, members)))

    def _group(self, level: str) -> dict[str, Domain]:
        slots, free = self.slots, self.dominant_free
        if level == CLUSTER:
            if not self.eligible:
                return {}
            return {CLUSTER: Domain(CLUSTER, self.eligible, sum(slots), sum(free))}
        if level == HOST:
            nodes = self.snapshot.nodes
            return {
                nodes[i].name: Domain(nodes[i].name, (i,), slots[i], free[i]) for i in self.eligible
            }
        index = self.snapshot.label_index(self.topology.label(level))
        excluded = self.excluded
        found = {}
        for name, positions in index.items():
            members = tuple(i for i in positions if i not in excluded) if excluded else positions
            if members:
                found[name] = self._count(name, members)
        return found


def gang_key(request: GangRequest) -> Hashable:
    """What placement reads of a request; gangs equal in it get the same answers."""
    return (
        request.pods,
        tuple(sorted(request.per_pod.items())),
        request.required,
        request.preferred,
        request.constraints,
        request.avoid_nodes,
    )


def snapshot_key(snapshot: CapacitySnapshot | None) -> Hashable:
    """A key naming one snapshot object (for answers that depend on a second snapshot)."""
    return None if snapshot is None else snapshot.memo("identity", object)


def pool_of(
    snapshot: CapacitySnapshot, request: GangRequest, topology: Topology, *, avoid: bool = True
) -> Pool:
    """The nodes the gang may use: ones kube-scheduler would bind its pods to (the pods' node
    selector, required node affinity, tolerations, the cordon), labelled for its ``required``
    level and, with ``avoid``, not avoided.

    A node without the required level's label is in no domain of that level, so a gang confined
    to one such domain cannot use it, not even at a finer level.
    """
    avoided = request.avoid_nodes if avoid else frozenset()
    key = (
        "pool",
        topology,
        request.pods,
        tuple(sorted(request.per_pod.items())),
        request.required,
        request.constraints,
        avoided,
    )
    return snapshot.memo(key, lambda: _pool(snapshot, request, topology, avoided))


def _pool(
    snapshot: CapacitySnapshot,
    request: GangRequest,
    topology: Topology,
    avoided: frozenset[str],
) -> Pool:
    nodes = snapshot.nodes
    excluded: set[int] = set()
    if request.required not in (None, CLUSTER, HOST):
        index = snapshot.label_index(topology.label(request.required))
        if sum(map(len, index.values())) < len(nodes):
            labelled = {i for positions in index.values() for i in positions}
            excluded.update(i for i in range(len(nodes)) if i not in labelled)
    excluded.update(snapshot.position(name) for name in avoided if name in snapshot)
    constraints = request.constraints
    # Without constraints of its own a pod is refused only by taints and the cordon.
    suspects = snapshot.restricted() if constraints == _UNCONSTRAINED else range(len(nodes))
    excluded.update(i for i in suspects if nodes[i].refusal(constraints) is not None)
    demand = pod_demand(request.per_pod)
    pods = request.pods
    slots = [s if s < pods else pods for s in snapshot.slot_column(demand)]
    for i in excluded:
        slots[i] = 0
    eligible = (
        tuple(i for i in range(len(nodes)) if i not in excluded)
        if excluded
        else tuple(range(len(nodes)))
    )
    dominant = _dominant(snapshot, demand, pods, excluded)
    free = snapshot.free_column(dominant)
    if excluded:
        zeroed = list(free)
        for i in excluded:
            zeroed[i] = 0
        free = tuple(zeroed)
    return Pool(
        snapshot,
        topology,
        pods,
        demand,
        eligible,
        frozenset(excluded),
        tuple(slots),
        dominant,
        free,
    )


def _dominant(
    snapshot: CapacitySnapshot, demand: Mapping[str, int], pods: int, excluded: AbstractSet[int]
) -> str:
    """The resource the gang takes the largest share of (as in dominant resource fairness).

    Ties go to the alphabetically first name; ``pods`` counts only when nothing else is asked.
    """
    candidates = sorted(resource for resource in demand if resource != PODS) or [PODS]
    best, best_share = candidates[0], Fraction(-1)
    if len(candidates) == 1:
        return best
    for resource in candidates:
        column = snapshot.free_column(resource)
        available = sum(column) - sum(column[i] for i in excluded)
        share = Fraction(10**18) if available == 0 else Fraction(demand[resource] * pods, available)
        if share > best_share:
            best, best_share = resource, share
    return best


def refusals(snapshot: CapacitySnapshot, constraints: PodConstraints) -> tuple[str, ...]:
    """Why kube-scheduler would refuse pods with these constraints, one phrase per refused
    node, in node order."""
    return snapshot.memo(
        ("refusals", constraints),
        lambda: tuple(
            why for node in snapshot.nodes if (why := node.refusal(constraints)) is not None
        ),
    )
