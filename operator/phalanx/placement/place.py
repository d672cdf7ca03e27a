"""Placing one gang: the finest topology domain that holds every pod, with ranks laid out in order.

The search is polynomial: per-node slot counts (how many pods of the gang's shape fit) are
computed once, then summed per domain at each level, finest level first. The first level with a
fitting domain wins; among its fitting domains the best fit (least leftover of the gang's dominant
resource) is chosen. Inside that domain ranks are assigned recursively through the finer levels,
so consecutive ranks share a rack, then a block, and so on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from phalanx.placement.gang import (
    GANG_EXCEEDS_DOMAIN,
    INSUFFICIENT_CAPACITY,
    POD_EXCEEDS_NODE,
    UNKNOWN_LEVEL,
    GangRequest,
    Placement,
    Unplaceable,
)
from phalanx.placement.snapshot import PODS, CapacitySnapshot, NodeInfo, pod_demand, slots_on
from phalanx.placement.topology import CLUSTER, HOST, Topology
from phalanx.quantity import format_amount

# How many domain names a message lists before summarising the rest.
_LISTED_DOMAINS = 5


def place_gang(
    snapshot: CapacitySnapshot,
    request: GangRequest,
    topology: Topology,
    total: CapacitySnapshot | None = None,
) -> Placement | Unplaceable:
    """Place every pod of ``request`` or none.

    ``total`` is the same cluster with no pods on it; without it no capacity shortage is
    reported as permanent, since only the empty cluster can tell "never" from "not now".
    """
    invalid = check_levels(request, topology)
    if invalid is not None:
        return invalid
    demand = pod_demand(request.per_pod)
    eligible = eligible_nodes(snapshot, request, topology)
    slots = {node.name: slots_on(node.free, demand, request.pods) for node in eligible}
    fit = _Fit.of(topology, request.pods, slots, demand, eligible)
    for level in topology.finest_first(request.required or CLUSTER):
        best: _Group | None = None
        # A host is its own domain: only the nodes that hold the whole gang are candidates.
        candidates = (
            [node for node in eligible if slots[node.name] >= request.pods]
            if level == HOST
            else eligible
        )
        for group in _groups(candidates, level, topology, fit):
            if group.slots >= request.pods and (best is None or fit.key(group) < fit.key(best)):
                best = group
        if best is not None:
            ranks = _assign(best.nodes, _child_depth(level, topology), request.pods, fit)
            return Placement(level=level, domain=best.name or CLUSTER, nodes=tuple(ranks))
    avoided = len(snapshot.nodes) - len(eligible)
    return _unplaceable(request, topology, eligible, slots, demand, total, avoided)


def eligible_nodes(
    snapshot: CapacitySnapshot, request: GangRequest, topology: Topology, *, avoid: bool = True
) -> list[NodeInfo]:
    """Nodes the gang may use: labelled for its ``required`` level and, with ``avoid``, not avoided.

    A node without the required level's label is in no domain of that level, so a gang confined
    to one such domain cannot use it, not even at a finer level.
    """
    label = None
    if request.required not in (None, CLUSTER, HOST):
        label = topology.label(request.required)
    skip = request.avoid_nodes if avoid else frozenset()
    return [
        node
        for node in snapshot.nodes
        if node.name not in skip and (label is None or node.labels.get(label))
    ]


def check_levels(request: GangRequest, topology: Topology) -> Unplaceable | None:
    """An Unplaceable for a request naming a level this topology lacks; such a spec never fits."""
    for field_name, level in (("required", request.required), ("preferred", request.preferred)):
        if level is not None and not topology.has_level(level):
            return Unplaceable(
                reason=UNKNOWN_LEVEL,
                message=(
                    f"spec.topology.{field_name} is {level!r}, but the operator's topology "
                    f"has only {', '.join((*topology.names, CLUSTER))}"
                ),
                permanent=True,
            )
    return None


def dominant_resource(demand: Mapping[str, int], pods: int, nodes: Sequence[NodeInfo]) -> str:
    """The resource the gang takes the largest share of (as in dominant resource fairness).

    Ties go to the alphabetically first name; ``pods`` counts only when nothing else is asked.
    """
    candidates = sorted(resource for resource in demand if resource != PODS) or [PODS]
    best, best_share = candidates[0], Fraction(-1)
    for resource in candidates:
        available = sum(max(node.free.get(resource, 0), 0) for node in nodes)
        share = Fraction(10**18) if available == 0 else Fraction(demand[resource] * pods, available)
        if share > best_share:
            best, best_share = resource, share
    return best


def describe_placement(placement: Placement, request: GangRequest, topology: Topology) -> str:
    """A human account of a placement, saying whether the ``preferred`` level was met."""
    distinct = len(set(placement.nodes))
    where = (
        "across the cluster"
        if placement.level == CLUSTER
        else f"in {placement.level} {placement.domain}"
    )
    text = f"placed {_count(len(placement.nodes), 'pod')} on {_count(distinct, 'node')} {where}"
    preferred = request.preferred
    if preferred is None or not topology.has_level(preferred):
        return text
    if topology.is_coarser(placement.level, preferred):
        return (
            f"{text}; no single {preferred} had {request.pods} free slots, "
            f"so the gang spans {_level_phrase(placement.level)} instead"
        )
    return f"{text}, within the preferred {preferred}"


@dataclass(frozen=True)
class _Group:
    """Nodes sharing one label value at some level (a domain), or the nodes lacking that label."""

    name: str | None  # None: nodes without the level's label (or the whole cluster)
    nodes: tuple[NodeInfo, ...]
    slots: int
    dominant_free: int

    @property
    def order(self) -> tuple[bool, str]:
        # Unlabelled nodes go last so labelled sub-domains keep the low, contiguous ranks.
        return (self.name is None, self.name or "")


@dataclass(frozen=True)
class _Fit:
    """What one placement call measures groups by: slots and free dominant resource per node."""

    topology: Topology
    pods: int
    slots: Mapping[str, int]
    dominant: str
    demand: Mapping[str, int]
    dominant_free: Mapping[str, int]

    @classmethod
    def of(
        cls,
        topology: Topology,
        pods: int,
        slots: Mapping[str, int],
        demand: Mapping[str, int],
        nodes: Sequence[NodeInfo],
    ) -> _Fit:
        dominant = dominant_resource(demand, pods, nodes)
        free = {node.name: max(node.free.get(dominant, 0), 0) for node in nodes}
        return cls(topology, pods, slots, dominant, demand, free)

    def group(self, name: str | None, nodes: Sequence[NodeInfo]) -> _Group:
        return _Group(
            name=name,
            nodes=tuple(nodes),
            slots=sum(self.slots[node.name] for node in nodes),
            dominant_free=sum(self.dominant_free[node.name] for node in nodes),
        )

    def key(self, group: _Group, count: int | None = None) -> tuple[int, int, bool, str]:
        """Best fit: least of the dominant resource left over, then fewest spare slots, then name."""
        count = self.pods if count is None else count
        leftover = group.dominant_free - count * self.demand[self.dominant]
        return (leftover, group.slots - count, *group.order)


def domains(nodes: Sequence[NodeInfo], level: str, topology: Topology) -> dict[str, list[NodeInfo]]:
    """The domains of ``level`` by name, each with its nodes in snapshot order.

    At ``host`` every node is its own domain, named after the node; at ``cluster`` there is one
    domain, ``cluster``. Elsewhere a node with no value (or an empty one) for the level's label
    belongs to no domain of that level.
    """
    if level == CLUSTER:
        return {CLUSTER: list(nodes)} if nodes else {}
    if level == HOST:
        return {node.name: [node] for node in nodes}
    label = topology.label(level)
    members: dict[str, list[NodeInfo]] = {}
    for node in nodes:
        value = node.labels.get(label)
        if value:
            members.setdefault(value, []).append(node)
    return members


def _groups(nodes: Sequence[NodeInfo], level: str, topology: Topology, fit: _Fit) -> list[_Group]:
    return [fit.group(name, members) for name, members in domains(nodes, level, topology).items()]


def _child_depth(level: str, topology: Topology) -> int:
    return topology.level_index(level) + 1


def _assign(nodes: Sequence[NodeInfo], depth: int, count: int, fit: _Fit) -> list[str]:
    """Node names in rank order for ``count`` pods, splitting by the level at ``depth``.

    Each sub-domain gets one contiguous run of ranks and each node is filled before the next.
    """
    host_depth = len(fit.topology.levels) - 1
    if depth > host_depth:  # the domain is a single node
        return [nodes[0].name] * count
    if depth == host_depth:
        children = [fit.group(node.name, (node,)) for node in nodes if fit.slots[node.name]]
    else:
        label = fit.topology.levels[depth].label
        split: dict[str | None, list[NodeInfo]] = {}
        for node in nodes:
            split.setdefault(node.labels.get(label) or None, []).append(node)
        children = [fit.group(value, members) for value, members in split.items()]
    chosen = _choose([child for child in children if child.slots > 0], count, fit)
    ranks: list[str] = []
    for child, share in sorted(chosen, key=lambda pair: pair[0].order):
        ranks.extend(_assign(child.nodes, depth + 1, share, fit))
    return ranks


def _choose(groups: Sequence[_Group], count: int, fit: _Fit) -> list[tuple[_Group, int]]:
    """Spread ``count`` pods over the fewest groups, the last one chosen by best fit.

    Largest-first uses the fewest groups; the group that takes the remainder is then swapped for
    the tightest one still able to hold it, which leaves big groups whole for later gangs.
    """
    ordered = sorted(groups, key=lambda group: (-group.slots, group.order))
    chosen: list[tuple[_Group, int]] = []
    remaining = count
    for index, group in enumerate(ordered):
        if group.slots >= remaining:
            candidates = (g for g in ordered[index:] if g.slots >= remaining)
            last = min(candidates, key=lambda g: fit.key(g, remaining))
            chosen.append((last, remaining))
            return chosen
        chosen.append((group, group.slots))
        remaining -= group.slots
    raise AssertionError(f"{count} pods do not fit in groups holding {count - remaining}")


def _unplaceable(
    request: GangRequest,
    topology: Topology,
    eligible: Sequence[NodeInfo],
    slots: Mapping[str, int],
    demand: Mapping[str, int],
    total: CapacitySnapshot | None,
    avoided: int,
) -> Unplaceable:
    scope = request.required or CLUSTER
    shape = _shape(request)
    within = "" if scope == CLUSTER else f" inside one {scope}"
    if total is not None and total.nodes:
        permanent = _never_fits(request, topology, total, demand, shape, within)
        if permanent is not None:
            return permanent
    message = f"needs {shape}{within}; " + _shortage(scope, topology, eligible, slots)
    if avoided:
        message += f"; {_count(avoided, 'node')} avoided after failures"
    return Unplaceable(reason=INSUFFICIENT_CAPACITY, message=message, permanent=False)


def _never_fits(
    request: GangRequest,
    topology: Topology,
    total: CapacitySnapshot,
    demand: Mapping[str, int],
    shape: str,
    within: str,
) -> Unplaceable | None:
    """A permanent Unplaceable if the gang could not fit even in the empty cluster.

    Avoided nodes count here: they are avoided after failures and may recover.
    """
    nodes = eligible_nodes(total, request, topology, avoid=False)
    scope = request.required or CLUSTER
    if not nodes:
        return Unplaceable(
            reason=GANG_EXCEEDS_DOMAIN,
            message=(
                f"needs {shape}{within}, but no schedulable node carries the {scope} label "
                f"{topology.label(scope)}; label the nodes or relax spec.topology.required"
            ),
            permanent=True,
        )
    empty_slots = {node.name: slots_on(node.free, demand, request.pods) for node in nodes}
    if not any(empty_slots.values()):
        too_big = []
        for resource, amount in sorted(demand.items()):
            largest = max((node.free.get(resource, 0) for node in nodes), default=0)
            if resource != PODS and amount > largest:
                too_big.append(
                    f"{format_amount(resource, amount)} {resource} "
                    f"(largest node: {format_amount(resource, largest)})"
                )
        detail = (
            "one pod asks for " + ", ".join(too_big)
            if too_big
            else f"no node can hold even one pod of {_pod_shape(request)} when empty"
        )
        return Unplaceable(
            reason=POD_EXCEEDS_NODE,
            message=f"needs {shape}{within}; {detail}; lower the per-pod request",
            permanent=True,
        )
    fit = _Fit.of(topology, request.pods, empty_slots, demand, nodes)
    largest = max((group.slots for group in _groups(nodes, scope, topology, fit)), default=0)
    if largest >= request.pods:
        return None
    where = "the whole cluster holds" if scope == CLUSTER else f"the largest {scope} holds"
    advice = (
        "ask for fewer pods or add nodes"
        if scope == CLUSTER
        else "ask for fewer pods or relax spec.topology.required"
    )
    return Unplaceable(
        reason=GANG_EXCEEDS_DOMAIN,
        message=(
            f"needs {shape}{within}, but {where} only {largest} such pods even when empty; {advice}"
        ),
        permanent=True,
    )


def _shortage(
    scope: str, topology: Topology, eligible: Sequence[NodeInfo], slots: Mapping[str, int]
) -> str:
    if not eligible:
        return "no schedulable node is available"
    if scope == CLUSTER:
        used = sum(1 for node in eligible if slots[node.name])
        return (
            f"the cluster has {_count(sum(slots.values()), 'free slot')} on {_count(used, 'node')}"
        )
    counts = {
        name: sum(slots[node.name] for node in members)
        for name, members in domains(eligible, scope, topology).items()
    }
    if not counts:
        return f"no schedulable node carries the {scope} label {topology.label(scope)}"
    largest = max(counts.values())
    text = f"the largest {scope} has {_count(largest, 'free slot')}"
    full = sorted(name for name, free in counts.items() if free == 0)
    if full:
        listed = ", ".join(full[:_LISTED_DOMAINS])
        if len(full) > _LISTED_DOMAINS:
            listed += f" and {len(full) - _LISTED_DOMAINS} more"
        text += f" (full {_plural(scope)}: {listed})"
    return text


def _shape(request: GangRequest) -> str:
    return f"{_count(request.pods, 'pod')} of {_pod_shape(request)}"


def _pod_shape(request: GangRequest) -> str:
    # Extended resources (accelerators) first: they are what a reader looks for.
    parts = sorted(
        ((resource, amount) for resource, amount in request.per_pod.items() if amount > 0),
        key=lambda item: ("/" not in item[0], item[0]),
    )
    if not parts:
        return "no resources"
    return " + ".join(f"{format_amount(resource, amount)} {resource}" for resource, amount in parts)


def _level_phrase(level: str) -> str:
    return "the whole cluster" if level == CLUSTER else f"one {level}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {_plural(noun)}"


def _plural(noun: str) -> str:
    return noun if noun.endswith("s") else noun + "s"
