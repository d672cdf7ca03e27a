"""The built-in autoscaler: recent load samples in, a replica count out. Pure.

Each sample is the load summed over every ready leader at one scrape (requests running,
waiting, or both, per `autoscaling.metric`). The count that load asks for is
`ceil(load / target)`. Scaling up follows the smallest count asked for within
`scaleUpStabilizationSeconds` (0: the latest sample, at once); scaling down follows the largest
count asked for within `scaleDownDelaySeconds`, and only once the samples cover that whole
window, so a brief lull or an operator restart never drops capacity.

With `minReplicas: 0` the service may scale to zero, but with no pods there is nothing to
scrape: waking from zero needs an external trigger (KEDA, or `kubectl scale`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from phalanx.api.inference import Autoscaling
from phalanx.constants import Reason

# Samples older than this are useless to every window the API allows.
MAX_WINDOW_SECONDS = 86400 + 60
# A scrape older than this no longer describes the service.
STALE_AFTER = timedelta(seconds=120)


@dataclass(frozen=True)
class Sample:
    """One scrape of a service: summed load and how many leaders reported it."""

    at: datetime
    running: float
    waiting: float
    leaders: int

    def load(self, metric: str) -> float:
        if metric == "requestsRunning":
            return self.running
        if metric == "requestsWaiting":
            return self.waiting
        return self.running + self.waiting


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    message: str

    def direction(self, current: int) -> str:
        if self.desired > current:
            return "up"
        return "down" if self.desired < current else "none"


def wanted(sample: Sample, spec: Autoscaling) -> int:
    return math.ceil(sample.load(spec.metric) / spec.target - 1e-9)


def clamp(count: int, spec: Autoscaling) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, count))


def recommend(
    history: Sequence[Sample], spec: Autoscaling, current: int, now: datetime
) -> Decision:
    """The replica count for `current` replicas given the samples seen so far (oldest first)."""
    recent = [s for s in history if s.at <= now]
    if not recent or now - recent[-1].at > STALE_AFTER:
        # Never act on silence: keep the count (but honour the bounds).
        desired = clamp(current, spec)
        return Decision(desired, Reason.NO_METRICS, "No recent load samples from ready leaders.")
    if current != clamp(current, spec):
        bounded = clamp(current, spec)
        return Decision(
            bounded,
            Reason.OUT_OF_BOUNDS,
            f"{current} replicas is outside {spec.min_replicas}..{spec.max_replicas}.",
        )
    latest = recent[-1]
    load = latest.load(spec.metric)
    about = f"{spec.metric} {load:g} for target {spec.target:g} per replica"

    up_since = now - timedelta(seconds=spec.scale_up_stabilization_seconds)
    up_window = [s for s in recent if s.at >= up_since] or [latest]
    up = clamp(min(wanted(s, spec) for s in up_window), spec)
    if up > current:
        return Decision(up, Reason.SCALE_UP, f"{about}: {current} -> {up} replicas.")

    down_since = now - timedelta(seconds=spec.scale_down_delay_seconds)
    down_window = [s for s in recent if s.at >= down_since]
    down = clamp(max(wanted(s, spec) for s in down_window), spec)
    if down < current:
        if recent[0].at > down_since:
            return Decision(
                current,
                Reason.SCALE_DOWN_STABILIZING,
                f"{about}: {down} replicas would do, but the load has not been low for "
                f"{spec.scale_down_delay_seconds}s yet.",
            )
        return Decision(down, Reason.SCALE_DOWN, f"{about}: {current} -> {down} replicas.")
    return Decision(current, Reason.WITHIN_TARGET, f"{about}: {current} replicas fit.")


def trim(history: Sequence[Sample], spec: Autoscaling, now: datetime) -> list[Sample]:
    """Samples still inside some window, plus the newest one that is older (window coverage)."""
    keep = max(spec.scale_down_delay_seconds, spec.scale_up_stabilization_seconds)
    since = now - timedelta(seconds=min(keep, MAX_WINDOW_SECONDS))
    inside = [s for s in history if s.at >= since]
    older = [s for s in history if s.at < since]
    return [*older[-1:], *inside]
