"""Rolling updates of InferenceService groups, Deployment-style: which groups to create and
delete to reach `replicas` groups at the target revision within maxSurge / maxUnavailable. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from phalanx.api.inference import InferenceServiceSpec


@dataclass(frozen=True)
class GroupView:
    """What rollout planning needs to know about one live group."""

    index: int
    revision: str
    ready: bool


@dataclass(frozen=True)
class RolloutStep:
    create: tuple[int, ...] = ()
    delete: tuple[int, ...] = ()


def resolve_bound(value: int | str, replicas: int, round_up: bool) -> int:
    """A count or a percentage of replicas (surge rounds up, unavailability down, as Deployments)."""
    if isinstance(value, int):
        return value
    share = replicas * int(value.rstrip("%")) / 100
    return int(-(-share // 1)) if round_up else int(share // 1)


def rollout_bounds(spec: InferenceServiceSpec, replicas: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) in groups; never both 0, or the update could not move."""
    surge = resolve_bound(spec.rollout.max_surge, replicas, round_up=True)
    unavailable = resolve_bound(spec.rollout.max_unavailable, replicas, round_up=False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


def _victims(groups: Sequence[GroupView]) -> list[GroupView]:
    """Cheapest to lose first: not ready, then the highest index."""
    return sorted(groups, key=lambda g: (g.ready, -g.index))


def plan_rollout(
    desired: int,
    revision: str,
    groups: Sequence[GroupView],
    max_surge: int,
    max_unavailable: int,
    stalled: bool = False,
    taken: Sequence[int] = (),
) -> RolloutStep:
    """One step towards `desired` groups at `revision`.

    While old-revision groups exist, ready groups never drop below `desired - max_unavailable`
    and all groups never exceed `desired + max_surge`; a stalled rollout creates no more new
    groups and deletes no old ones. New groups take the lowest indices not in `taken` (indices
    of live groups and of groups still terminating).
    """
    new = [g for g in groups if g.revision == revision]
    old = [g for g in groups if g.revision != revision]
    delete: list[GroupView] = []
    if len(new) > desired:
        delete += _victims(new)[: len(new) - desired]
        new = [g for g in new if g not in delete]
    if not old:
        count = desired - len(new)
    else:
        floor = max(desired - max_unavailable, 0)
        ceiling = desired + max_surge
        available = sum(g.ready for g in [*new, *old])
        budget = available - floor
        for group in [] if stalled else _victims(old):
            if group.ready:
                if budget <= 0:
                    break
                budget -= 1
            delete.append(group)
        remaining = len(new) + len(old) - sum(1 for g in delete if g in old)
        count = 0 if stalled else min(desired - len(new), ceiling - remaining)
    used = {*taken, *(g.index for g in groups)}
    create: list[int] = []
    candidate = 0
    while len(create) < count:
        if candidate not in used:
            create.append(candidate)
        candidate += 1
    return RolloutStep(create=tuple(create), delete=tuple(sorted(g.index for g in delete)))
