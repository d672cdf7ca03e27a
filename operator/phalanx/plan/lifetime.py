"""The clock-driven rules of a job's life: activeDeadlineSeconds, ttlSecondsAfterFinished,
and pods stuck terminating on a dead node. Pure: `now` comes in, seconds or names go out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from phalanx import observe
from phalanx.api.trainjob import LLMTrainJobSpec

# A pod stuck terminating on a node that stopped answering is removed by force after this.
FORCE_DELETE_AFTER = timedelta(seconds=30)


def _left(since: Any, seconds: int | None, now: datetime) -> float | None:
    start = observe.parse_time(since)
    if seconds is None or start is None:
        return None
    return (start + timedelta(seconds=seconds) - now).total_seconds()


def deadline_left(spec: LLMTrainJobSpec, status: Mapping[str, Any], now: datetime) -> float | None:
    """Seconds until activeDeadlineSeconds runs out (<= 0: exceeded), None without one or
    while the clock is not running.

    Job semantics, as for a Job that a queue (Kueue) admits by resuming it: the clock starts
    when the job becomes active, its gang first admitted (`status.activeSince`), so time queued
    for capacity is not counted; it keeps running through gang restarts and re-queues; a
    suspension stops it and a resume starts it afresh (a Job's startTime is reset on resume).
    """
    return _left(status.get("activeSince"), spec.run_policy.active_deadline_seconds, now)


def ttl_left(spec: LLMTrainJobSpec, status: Mapping[str, Any], now: datetime) -> float | None:
    """Seconds until a finished job is deleted (<= 0: now), None without a TTL."""
    return _left(status.get("completionTime"), spec.run_policy.ttl_seconds_after_finished, now)


def stuck_terminating(
    pods: Sequence[Mapping[str, Any]], ready_nodes: frozenset[str], now: datetime
) -> tuple[list[str], float | None]:
    """Pods to delete by force (terminating on a node that is gone: no kubelet is left to
    confirm) and the seconds until the next one is due, if any is still waiting."""
    force: list[str] = []
    wait: float | None = None
    for pod in pods:
        meta = pod.get("metadata", {})
        deleted = observe.parse_time(meta.get("deletionTimestamp"))
        node = observe.node_of(pod)
        if deleted is None or not node or node in ready_nodes:
            continue
        requested = deleted - timedelta(seconds=int(meta.get("deletionGracePeriodSeconds") or 0))
        if now - requested >= FORCE_DELETE_AFTER:
            force.append(str(meta["name"]))
        else:
            due = (requested + FORCE_DELETE_AFTER - now).total_seconds()
            wait = due if wait is None else min(wait, due)
    return force, wait
