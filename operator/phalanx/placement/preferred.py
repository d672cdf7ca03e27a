"""The preferred-domain hold: keep a gang queued for a while rather than spread it wider than
it needs. Pure: the clock (`now`) and each gang's wait come in with the requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from phalanx.constants import Reason
from phalanx.placement.gang import GangRequest, Placement, Unplaceable
from phalanx.placement.place import place_gang
from phalanx.placement.snapshot import CapacitySnapshot
from phalanx.placement.topology import Topology

WAITING_FOR_PREFERRED = Reason.WAITING_FOR_PREFERRED_DOMAIN
Decided = tuple[GangRequest, Placement | Unplaceable]


@dataclass(frozen=True)
class PreferredHold:
    """A gang waiting for one domain of `level` instead of taking `placement` now."""

    level: str
    remaining: float
    verdict: Unplaceable


def preferred_hold(
    request: GangRequest,
    placement: Placement,
    topology: Topology,
    total: CapacitySnapshot,
    now: float,
) -> PreferredHold | None:
    """Like Slurm's `--switches=1@timeout`: a gang that one domain of its preferred level could
    hold (one rack, say) waits up to `request.preferred_wait` seconds since it was queued for
    such a domain to free up before it is placed in a coarser one. The preferred level
    defaults to the tightest level that holds the gang in the empty cluster (`total`).

    None when the gang should take `placement` now.
    """
    wait = request.preferred_wait
    waited = now - request.created
    if wait <= 0 or waited >= wait:
        return None
    target = request.preferred
    if target is None or not topology.has_level(target):
        ideal = place_gang(total, request, topology)
        target = ideal.level if isinstance(ideal, Placement) else None
    if target is None or not topology.is_coarser(placement.level, target):
        return None
    remaining = wait - waited
    verdict = Unplaceable(
        WAITING_FOR_PREFERRED,
        f"one {target} would hold the gang but none is free now; waiting up to "
        f"{remaining:.0f}s more for one before placing it in {placement.level} "
        f"{placement.domain} (spec.topology.preferredWaitSeconds)",
        permanent=False,
    )
    return PreferredHold(target, remaining, verdict)


def recheck_after(decisions: Sequence[Decided], now: float) -> float | None:
    """Seconds until the first preferred-domain wait among `decisions` runs out, if any."""
    waits = [
        request.preferred_wait - (now - request.created)
        for request, result in decisions
        if isinstance(result, Unplaceable) and result.reason == WAITING_FOR_PREFERRED
    ]
    return max(0.0, min(waits)) if waits else None
