"""Admitting a queue of gangs against one snapshot: order, reservations and backfill.

Gangs are taken by priority (highest first), then creation time (oldest first), then key. Each
placed gang's pods are reserved before the next gang is tried, so no node is promised twice.

Backfill is conservative. A gang that cannot fit now (but could in the empty cluster) holds the
one domain it is waiting on: at the finest level where it could ever fit, the domain closest to
fitting now (most free slots, then most of the gang's dominant resource free). Gangs behind it may still be placed, but only outside held domains, so
small gangs cannot starve a large one by nibbling at the capacity it is waiting for. Without the
empty-cluster snapshot the held domain is the one with the most free slots at the gang's
``required`` level, which without ``required`` is the whole cluster: strict order.
A permanently unplaceable gang holds nothing, and neither does one that does not ``hold``
(`GangRequest.holds`): the admission loop clears it for a gang whose estimated start is
unknown because no running job that reports an end frees enough for it (`plan.queue_wait`).
Holding capacity for such a gang would idle it for as long as work of unknown length runs, so
gangs behind it that fit now start now, as under Kueue's BestEffortFIFO; a gang that can tell
when it would start keeps the conservative guarantee.

A gang that fits now but waits for its preferred level (`preferred.preferred_hold`, given
``now``) reserves nothing of the placement it declined: like a gang that does not fit, it
holds only the one domain of its preferred level it is waiting on, and gangs behind it that
fit elsewhere are placed in the same pass.

With a spare policy (`placement.spares`) ordinary gangs never use the spare nodes; preemptible
gangs may. A gang recovering from failures goes first and is placed inside the domain it ran
in when that domain holds it, fillers counted as free: its placement names the nodes whose
filler must leave (``displaced``). Only when its domain cannot hold it is it placed as any
other gang.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from phalanx.constants import Reason
from phalanx.placement.gang import QUEUED_BEHIND, GangRequest, Placement, Unplaceable
from phalanx.placement.place import place_gang
from phalanx.placement.pool import gang_key, pool_of, snapshot_key
from phalanx.placement.preferred import preferred_hold
from phalanx.placement.snapshot import CapacitySnapshot
from phalanx.placement.spares import (
    SPARES_ENV,
    Spares,
    displaced,
    domain_of,
    place_recovery,
    reserve_of_total,
)
from phalanx.placement.topology import CLUSTER, Topology

Decision = tuple[GangRequest, Placement | Unplaceable]


def queue_order(requests: Iterable[GangRequest]) -> list[GangRequest]:
    """Recoveries first (only set under a spare policy), then priority (highest first), then
    creation time (oldest first), then key."""
    return sorted(
        requests,
        key=lambda r: (r.recover is None, -r.priority, r.created, r.key),
    )


def admission_window(
    requests: Iterable[GangRequest], size: int
) -> tuple[list[GangRequest], list[Decision]]:
    """The head of the queue that one admission pass considers, and a `Queued` verdict for
    each gang behind it; ``size`` 0 considers the whole queue. A pass costs little per gang
    (gangs of one shape share every answer on an unchanged snapshot), so the whole queue is
    the default: a bounded window makes a gang that fits wait behind gangs that do not."""
    ordered = queue_order(requests)
    if size <= 0:
        return ordered, []
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
    now: float | None = None,
    spares: Spares | None = None,
) -> list[Decision]:
    """A decision for every request, in the order they were considered; with ``now`` (and
    ``total``) gangs may wait for their preferred domain (`WaitingForPreferredDomain`); with
    ``spares`` ordinary gangs keep off the spare nodes and recoveries take them first."""
    ordered = queue_order(requests)
    keys = [request.key for request in ordered]
    if len(set(keys)) != len(keys):
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"gang keys must be unique, repeated: {', '.join(duplicates)}")
    free = snapshot
    reclaim = spares.reclaimable if spares is not None else None
    reserved = spares.reserved if spares is not None else frozenset()
    # "Never fits" for an ordinary gang is judged without the spares of the empty cluster.
    ordinary_total = (
        total.without(reserve_of_total(total, spares.policy, topology))
        if spares is not None and spares.policy is not None and total is not None
        else total
    )
    # Room placed for gangs' own spares in this pass: later ordinary gangs keep off it too.
    kept: set[str] = set()
    held: set[str] = set()
    waiting: list[str] = []
    decisions: list[Decision] = []
    for request in ordered:
        ordinary = spares is not None and not request.preemptible
        keep_off = reserved if ordinary else frozenset()
        if ordinary and request.recover is not None:
            # Its own domain could not hold it: it may still use what is left there.
            level, domain = request.recover
            keep_off = keep_off - {n.name for n in domain_of(free, level, domain, topology).nodes}
        request_total = ordinary_total if ordinary else total
        if ordinary:
            keep_off = keep_off | kept
        if reclaim is not None and request.recover is not None:
            recovered = place_recovery(reclaim.without(held), _widened(request), topology)
            if recovered is None and request.spares:
                # Its domain lost the room for its spares too: the gang itself comes first.
                bare = replace(request, spares=0)
                recovered = place_recovery(reclaim.without(held), bare, topology)
            else:
                recovered = recovered and _split(recovered, request)
            if recovered is not None:
                recovered = replace(
                    recovered,
                    recovered=True,
                    displaced=displaced(recovered, free, request.per_pod),
                )
                free = free.with_reserved(recovered.nodes, request.per_pod)
                reclaim = reclaim.with_reserved(recovered.nodes, request.per_pod)
                kept |= set(recovered.spare_nodes)
                decisions.append((request, recovered))
                continue
        result = _place(free.without(held | keep_off), request, topology, request_total)
        hold = (
            preferred_hold(request, result, topology, request_total, now)
            if isinstance(result, Placement) and request_total is not None and now is not None
            else None
        )
        if hold is not None:
            held |= waiting_domain(
                free.without(held | keep_off),
                _widened(request),
                topology,
                request_total,
                hold.level,
            )
            waiting.append(request.key)
            decisions.append((request, hold.verdict))
            continue
        if isinstance(result, Placement):
            free = free.with_reserved(result.nodes, request.per_pod)
            kept |= set(result.spare_nodes)
            if reclaim is not None and not request.preemptible:
                reclaim = reclaim.with_reserved(result.nodes, request.per_pod)
        elif not result.permanent:
            usable = free.without(keep_off)
            if held and isinstance(_place(usable, request, topology, request_total), Placement):
                result = Unplaceable(
                    reason=QUEUED_BEHIND,
                    message=(
                        "fits now, but only on capacity held for "
                        f"{_listing(waiting)}, ahead of it in the queue"
                    ),
                    permanent=False,
                )
            if request.holds:
                held |= waiting_domain(usable, _widened(request), topology, request_total)
                waiting.append(request.key)
        policy = spares.policy if spares is not None else None
        if isinstance(result, Unplaceable) and policy is not None and ordinary and reserved:
            result = replace(
                result,
                message=(
                    f"{result.message}; {policy.count} node{'s' if policy.count != 1 else ''} "
                    f"of every {policy.level} kept spare for recovery ({SPARES_ENV}={policy}), "
                    "usable only by preemptible gangs (spec.runPolicy.preemptible)"
                ),
            )
        decisions.append((request, result))
    return decisions


def _widened(request: GangRequest) -> GangRequest:
    """The gang with its own spares' room as more pods of its shape."""
    if not request.spares:
        return request
    return replace(request, pods=request.pods + request.spares, spares=0)


def _split(placement: Placement, request: GangRequest) -> Placement:
    """A placement of the widened gang: its first ranks are the gang, the rest its spares."""
    if not request.spares:
        return placement
    return replace(
        placement,
        nodes=placement.nodes[: request.pods],
        spare_nodes=placement.nodes[request.pods :],
    )


def _place(
    snapshot: CapacitySnapshot,
    request: GangRequest,
    topology: Topology,
    total: CapacitySnapshot | None,
) -> Placement | Unplaceable:
    """`place_gang`, with room for the gang's own spares beside it in its domain."""
    result = place_gang(snapshot, _widened(request), topology, total)
    if isinstance(result, Placement):
        return _split(result, request)
    if request.spares:
        spares = request.spares
        note = f"{request.pods} pods and room for failurePolicy.spares {spares} more"
        return replace(result, message=f"{result.message} (counting {note})")
    return result


def waiting_domain(
    snapshot: CapacitySnapshot,
    request: GangRequest,
    topology: Topology,
    total: CapacitySnapshot | None = None,
    level: str | None = None,
) -> frozenset[str]:
    """The nodes of the domain a blocked gang waits on (see the module docstring); with
    ``level``, the domain of that level it waits on."""
    key = ("waiting-domain", topology, gang_key(request), snapshot_key(total), level)
    return snapshot.memo(key, lambda: _waiting_domain(snapshot, request, topology, total, level))


def _waiting_domain(
    snapshot: CapacitySnapshot,
    request: GangRequest,
    topology: Topology,
    total: CapacitySnapshot | None,
    level: str | None,
) -> frozenset[str]:
    pool = pool_of(snapshot, request, topology)
    allowed = [level] if level is not None else topology.finest_first(request.required or CLUSTER)
    possible: set[str] | None = None  # domains the gang fits when empty; None: unknown
    level = allowed[-1]
    empty = None if total is None else pool_of(total, request, topology, avoid=False)
    if empty is not None and empty.eligible:
        for candidate in allowed:
            fitting = {
                domain.name for domain in empty.domains(candidate) if domain.slots >= request.pods
            }
            if fitting:
                level, possible = candidate, fitting
                break
    best: tuple[int, int, str] | None = None
    best_members: tuple[int, ...] = ()
    for domain in pool.domains(level):
        if possible is not None and domain.name not in possible:
            continue
        # Closest to fitting: most free slots, then most of the dominant resource free (a host
        # with half its GPUs free is nearer than a full one), then name. Negated: smallest wins.
        key = (-domain.slots, -domain.dominant_free, domain.name)
        if best is None or key < best:
            best, best_members = key, domain.members
    return frozenset(node.name for node in pool.nodes(best_members))


def _listing(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"
