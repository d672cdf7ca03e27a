"""Admitting a queue of gangs against one snapshot: order, reservations and backfill.

Gangs are taken by priority (highest first), then creation time (oldest first), then key. Each
placed gang's pods are reserved before the next gang is tried, so no node is promised twice.

Backfill is conservative. A gang that cannot fit now (but could in the empty cluster) holds the
one domain it is waiting on: at the finest level where it could ever fit, the domain closest to
fitting now (most free slots, then most of the gang's dominant resource free). Gangs behind it may still be placed, but only outside held domains, so
small gangs cannot starve a large one by nibbling at the capacity it is waiting for. Without the
empty-cluster snapshot the held domain is the one with the most free slots at the gang's
``required`` level, which without ``required`` is the whole cluster: strict order.
A permanently unplaceable gang holds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from phalanx.constants import Reason
from phalanx.placement.gang import QUEUED_BEHIND, GangRequest, Placement, Unplaceable
from phalanx.placement.place import domains, dominant_resource, eligible_nodes, place_gang
from phalanx.placement.snapshot import CapacitySnapshot, pod_demand, slots_on
from phalanx.placement.topology import CLUSTER, Topology

Decision = tuple[GangRequest, Placement | Unplaceable]


def queue_order(requests: Iterable[GangRequest]) -> list[GangRequest]:
    """Priority (highest first), then creation time (oldest first), then key."""
    return sorted(requests, key=lambda request: (-request.priority, request.created, request.key))


def admission_window(
    requests: Iterable[GangRequest], size: int
) -> tuple[list[GangRequest], list[Decision]]:
    """The head of the queue that one admission pass considers, and a `Queued` verdict for
    each gang behind it. Every placement attempt scans every node and admissions happen at
    the head, so a pass looks at a bounded window and the rest wait their turn."""
    ordered = queue_order(requests)
    head, tail = ordered[:size], ordered[size:]
    waiting: list[Decision] = [
        (
            request,
            Unplaceable(
                Reason.QUEUED,
                f"Waiting in the admission queue ({position - 1} gangs ahead at the last look).",
                permanent=False,
            ),
        )
        for position, request in enumerate(tail, start=size + 1)
    ]
    return head, waiting


def admit(
    snapshot: CapacitySnapshot,
    requests: Iterable[GangRequest],
    topology: Topology,
    total: CapacitySnapshot | None = None,
) -> list[Decision]:
    """A decision for every request, in the order they were considered."""
    ordered = queue_order(requests)
    keys = [request.key for request in ordered]
    if len(set(keys)) != len(keys):
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"gang keys must be unique, repeated: {', '.join(duplicates)}")
    free = snapshot
    held: set[str] = set()
    waiting: list[str] = []
    decisions: list[Decision] = []
    for request in ordered:
        result = place_gang(free.without(held), request, topology, total)
        if isinstance(result, Placement):
            free = free.with_reserved(result.nodes, request.per_pod)
        elif not result.permanent:
            if held and isinstance(place_gang(free, request, topology, total), Placement):
                result = Unplaceable(
                    reason=QUEUED_BEHIND,
                    message=(
                        "fits now, but only on capacity held for "
                        f"{_listing(waiting)}, ahead of it in the queue"
                    ),
                    permanent=False,
                )
            held |= waiting_domain(free, request, topology, total)
            waiting.append(request.key)
        decisions.append((request, result))
    return decisions


def waiting_domain(
    snapshot: CapacitySnapshot,
    request: GangRequest,
    topology: Topology,
    total: CapacitySnapshot | None = None,
) -> frozenset[str]:
    """The nodes of the domain a blocked gang waits on (see the module docstring)."""
    demand = pod_demand(request.per_pod)
    eligible = eligible_nodes(snapshot, request, topology)
    slots = {node.name: slots_on(node.free, demand, request.pods) for node in eligible}
    allowed = topology.finest_first(request.required or CLUSTER)
    possible: set[str] | None = None  # domains the gang fits when empty; None: unknown
    level = allowed[-1]
    empty_nodes = [] if total is None else eligible_nodes(total, request, topology, avoid=False)
    if empty_nodes:
        empty = {node.name: slots_on(node.free, demand, request.pods) for node in empty_nodes}
        for candidate in allowed:
            fitting = {
                name
                for name, members in domains(empty_nodes, candidate, topology).items()
                if sum(empty[node.name] for node in members) >= request.pods
            }
            if fitting:
                level, possible = candidate, fitting
                break
    dominant = dominant_resource(demand, request.pods, eligible)
    best: tuple[int, int, str] | None = None
    best_nodes: frozenset[str] = frozenset()
    for name, members in domains(eligible, level, topology).items():
        if possible is not None and name not in possible:
            continue
        # Closest to fitting: most free slots, then most of the dominant resource free (a host
        # with half its GPUs free is nearer than a full one), then name. Negated: smallest wins.
        key = (
            -sum(slots[node.name] for node in members),
            -sum(max(node.free.get(dominant, 0), 0) for node in members),
            name,
        )
        if best is None or key < best:
            best, best_nodes = key, frozenset(node.name for node in members)
    return best_nodes


def _listing(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"
