"""The preferred-domain hold: keep a gang queued for a while rather than spread it wider than
it needs. Pure: the clock (`now`) and each gang's wait come in with the requests."""

from __future__ import annotations

from collections.abc import Sequence

from phalanx.constants import Reason
from phalanx.placement.gang import GangRequest, Placement, Unplaceable
from phalanx.placement.place import place_gang
from phalanx.placement.snapshot import CapacitySnapshot
from phalanx.placement.topology import Topology

WAITING_FOR_PREFERRED = Reason.WAITING_FOR_PREFERRED_DOMAIN
Decided = tuple[GangRequest, Placement | Unplaceable]


def hold_for_preferred(
    decisions: Sequence[Decided],
    topology: Topology,
    total: CapacitySnapshot,
    now: float,
) -> tuple[list[Decided], float | None]:
    """Like Slurm's `--switches=1@timeout`: a gang that one domain of its preferred level could
    hold (one rack, say) waits up to `request.preferred_wait` seconds since it was queued for
    such a domain to free up before it is placed in a coarser one. The preferred level
    defaults to the tightest level that holds the gang in the empty cluster (`total`).

    Returns the decisions (held placements turned into `WaitingForPreferredDomain`) and, if
    any gang is held, the seconds until the first wait runs out (when to look again).
    """
    recheck: float | None = None
    held: list[Decided] = []
    for request, result in decisions:
        wait = request.preferred_wait
        waited = now - request.created
        if not isinstance(result, Placement) or wait <= 0 or waited >= wait:
            held.append((request, result))
            continue
        target = request.preferred
        if target is None or not topology.has_level(target):
            ideal = place_gang(total, request, topology)
            target = ideal.level if isinstance(ideal, Placement) else None
        if target is None or not topology.is_coarser(result.level, target):
            held.append((request, result))
            continue
        remaining = wait - waited
        recheck = remaining if recheck is None else min(recheck, remaining)
        verdict = Unplaceable(
            WAITING_FOR_PREFERRED,
            f"one {target} would hold the gang but none is free now; waiting up to "
            f"{remaining:.0f}s more for one before placing it in {result.level} "
            f"{result.domain} (spec.topology.preferredWaitSeconds)",
            permanent=False,
        )
        held.append((request, verdict))
    return held, recheck
