"""Placing one gang: the finest topology domain that holds every pod, with ranks laid out in order.

The search is polynomial: per-node slot counts (how many pods of the gang's shape fit) are
computed once, then summed per domain at each level, finest level first (the gang's
`pool.Pool`, over the snapshot's label indexes). The first level with a fitting domain wins;
among its fitting domains the best fit (least leftover of the gang's dominant resource) is
chosen. Inside that domain ranks are assigned recursively through the finer levels, so
consecutive ranks share a rack, then a block, and so on. Answers are memoized on the snapshot:
a gang asking what another asked of the same snapshot gets the same answer without a search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from phalanx.constants import Reason
from phalanx.placement.filters import summarize_refusals
from phalanx.placement.gang import (
    GANG_EXCEEDS_DOMAIN,
    INSUFFICIENT_CAPACITY,
    POD_EXCEEDS_NODE,
    UNKNOWN_LEVEL,
    GangRequest,
    Placement,
    Unplaceable,
)
from phalanx.placement.pool import Pool, gang_key, pool_of, refusals, snapshot_key
from phalanx.placement.snapshot import PODS, CapacitySnapshot, NodeInfo
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
    key = ("place", topology, gang_key(request), snapshot_key(total))
    return snapshot.memo(key, lambda: _place(snapshot, request, topology, total))


def _place(
    snapshot: CapacitySnapshot,
    request: GangRequest,
    topology: Topology,
    total: CapacitySnapshot | None,
) -> Placement | Unplaceable:
    invalid = check_levels(request, topology)
    if invalid is not None:
        return invalid
    pool = pool_of(snapshot, request, topology)
    for level in topology.finest_first(request.required or CLUSTER):
        best = pool.best(level)
        if best is not None:
            ranks = _assign(best.members, _child_depth(level, topology), request.pods, _Fit(pool))
            return Placement(level=level, domain=best.name, nodes=tuple(ranks))
    return _unplaceable(request, topology, snapshot, pool, total)


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


class _Group(NamedTuple):
    """Nodes sharing one label value at some level (a domain), or the nodes lacking that label."""

    name: str | None  # None: nodes without the level's label (or the whole cluster)
    members: tuple[int, ...]  # positions in the snapshot
    slots: int
    dominant_free: int

    @property
    def order(self) -> tuple[bool, str]:
        # Unlabelled nodes go last so labelled sub-domains keep the low, contiguous ranks.
        return (self.name is None, self.name or "")


@dataclass(frozen=True)
class _Fit:
    """What ranks are laid out by inside the chosen domain: the gang's pool (slots and free
    dominant resource per node) and its size."""

    pool: Pool

    def group(self, name: str | None, members: tuple[int, ...]) -> _Group:
        slots = sum(map(self.pool.slots.__getitem__, members))
        return _Group(name, members, slots, sum(map(self.pool.dominant_free.__getitem__, members)))

    def key(self, group: _Group, count: int | None = None) -> tuple[int, int, bool, str]:
        """Best fit: least of the dominant resource left over, then fewest spare slots, then name."""
        pool = self.pool
        count = pool.pods if count is None else count
        leftover = group.dominant_free - count * pool.demand[pool.dominant]
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


def _child_depth(level: str, topology: Topology) -> int:
    return topology.level_index(level) + 1


def _assign(members: Sequence[int], depth: int, count: int, fit: _Fit) -> list[str]:
    """Node names in rank order for ``count`` pods on the nodes at ``members``, splitting by the
    level at ``depth``.

    Each sub-domain gets one contiguous run of ranks and each node is filled before the next.
    """
    pool = fit.pool
    nodes, levels = pool.snapshot.nodes, pool.topology.levels
    host_depth = len(levels) - 1
    if depth > host_depth:  # the domain is a single node
        return [nodes[members[0]].name] * count
    if depth == host_depth:
        slots, free = pool.slots, pool.dominant_free
        children = [_Group(nodes[i].name, (i,), slots[i], free[i]) for i in members if slots[i]]
    else:
        label = levels[depth].label
        split: dict[str | None, list[int]] = {}
        for i in members:
            split.setdefault(nodes[i].labels.get(label) or None, []).append(i)
        children = [fit.group(value, tuple(positions)) for value, positions in split.items()]
    chosen = _choose([child for child in children if child.slots > 0], count, fit)
    ranks: list[str] = []
    for child, share in sorted(chosen, key=lambda pair: pair[0].order):
        ranks.extend(_assign(child.members, depth + 1, share, fit))
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
    snapshot: CapacitySnapshot,
    pool: Pool,
    total: CapacitySnapshot | None,
) -> Unplaceable:
    scope = request.required or CLUSTER
    within = "" if scope == CLUSTER else f" inside one {scope}"
    if total is not None and total.nodes:
        key = ("never-fits", topology, gang_key(request))
        permanent = total.memo(key, lambda: _never_fits(request, topology, total, within))
        if permanent is not None:
            return permanent
    message = f"needs {_shape(request)}{within}; " + _shortage(scope, pool)
    refused = refusals(snapshot, request.constraints)
    if refused:
        message += f"; refused by the pods' scheduling constraints: {summarize_refusals(refused)}"
    avoided = sum(1 for name in request.avoid_nodes if name in snapshot)
    if avoided:
        message += f"; {_count(avoided, 'node')} avoided after failures"
    return Unplaceable(reason=INSUFFICIENT_CAPACITY, message=message, permanent=False)


def _never_fits(
    request: GangRequest,
    topology: Topology,
    total: CapacitySnapshot,
    within: str,
) -> Unplaceable | None:
    """A permanent Unplaceable if the gang could not fit even in the empty cluster.

    Avoided nodes count here: they are avoided after failures and may recover.
    """
    pool = pool_of(total, request, topology, avoid=False)
    nodes = pool.nodes(pool.eligible)
    shape = _shape(request)
    scope = request.required or CLUSTER
    refused = refusals(total, request.constraints)
    if len(refused) == len(total.nodes):
        return Unplaceable(
            reason=Reason.NO_MATCHING_NODES,
            message=(
                f"needs {shape}{within}, but kube-scheduler would refuse the pods every node: "
                f"{summarize_refusals(refused)}; fix spec.accelerator.product or the nodeSelector, "
                "affinity or tolerations of spec.podTemplate, or label or untaint the nodes"
            ),
            permanent=True,
        )
    if not nodes:
        return Unplaceable(
            reason=GANG_EXCEEDS_DOMAIN,
            message=(
                f"needs {shape}{within}, but no schedulable node carries the {scope} label "
                f"{topology.label(scope)}; label the nodes or relax spec.topology.required"
            ),
            permanent=True,
        )
    if not any(pool.slots):
        too_big = []
        for resource, amount in sorted(pool.demand.items()):
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
        if refused:
            # The big nodes may be exactly the ones the pods' own constraints rule out.
            detail += (
                f" ({_count(len(refused), 'other node')} refused by the pods' scheduling "
                f"constraints: {summarize_refusals(refused)})"
            )
        return Unplaceable(
            reason=POD_EXCEEDS_NODE,
            message=f"needs {shape}{within}; {detail}; lower the per-pod request",
            permanent=True,
        )
    largest = max((domain.slots for domain in pool.domains(scope)), default=0)
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


def _shortage(scope: str, pool: Pool) -> str:
    if not pool.eligible:
        return "no schedulable node is available"
    if scope == CLUSTER:
        used = sum(1 for slots in pool.slots if slots)
        return f"the cluster has {_count(sum(pool.slots), 'free slot')} on {_count(used, 'node')}"
    counts = {domain.name: domain.slots for domain in pool.domains(scope)}
    if not counts:
        return f"no schedulable node carries the {scope} label {pool.topology.label(scope)}"
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
        # The pod slot every pod takes is implied; only what the pod asks for is shown.
        (
            (resource, amount)
            for resource, amount in request.per_pod.items()
            if amount > 0 and resource != PODS
        ),
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
