"""Where a job's wall-clock time went: the goodput timeline and its arithmetic (docs/goodput.md).

Every pass of the planner folds the time since the previous pass into the state the job was
in (`Queued`, `Starting`, `Training`, `Restarting`, `Suspended`), books the work a restart
throws away (the steps after the newest checkpoint, and the time since the last step was
seen) and the time the trainer spent stalled on checkpoint saves, and derives the effective
training time ratio. The running totals live in `status.goodput`, so they survive operator
restarts. Pure: the clock comes in as `now`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .gang_progress import GangProgress, report_int, report_number, report_seconds

QUEUED = "Queued"
STARTING = "Starting"
TRAINING = "Training"
RESTARTING = "Restarting"
SUSPENDED = "Suspended"
FINISHED = "Finished"

# Seconds of each state, by the status field that holds them.
BUCKETS = {
    QUEUED: "queuedSeconds",
    STARTING: "startingSeconds",
    TRAINING: "trainingSeconds",
    RESTARTING: "restartSeconds",
    SUSPENDED: "suspendedSeconds",
}
TOTALS = (
    "queuedSeconds",
    "startingSeconds",
    "trainingSeconds",
    "checkpointSeconds",
    "restartSeconds",
    "suspendedSeconds",
    "lostSeconds",
    "productiveSeconds",
)
# A pass that changes nothing but the running totals writes them at most this often, so an
# idle job does not cost a status write per pass; every state change is written at once.
FOLD_SECONDS = 30.0


@dataclass(frozen=True)
class Observation:
    """What one pass knows about the job, after its own decisions."""

    finished: bool = False
    suspended: bool = False
    admitted: bool = False
    running: bool = False  # every rank of the current gang is running
    generation: int = 1
    # This pass restarted the gang after a failure (the restart count went up).
    restarted: bool = False
    # From the current gang's own reports (None: it has reported nothing yet).
    step: int | None = None
    # When the poller first saw that step: the hang detector's clock, so the silence booked
    # on a restart is the silence that triggered it, not the later pass that read it.
    stepped_at: datetime | None = None
    advanced: bool = False  # some rank's step moved since the gang first reported
    checkpoint_step: int | None = None
    step_seconds: float | None = None
    # The trainer's running total of seconds its loop was blocked saving checkpoints.
    checkpoint_stall_seconds: float | None = None
    # This pass restarted the gang for a hang that had stalled its step this long (the hang
    # detector's own measure, polled; lost at least, whatever the passes saw of it).
    hang_seconds: float | None = None


def stamp(now: datetime) -> str:
    """RFC 3339 with microseconds: the totals are sums of sub-second intervals."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def state_of(previous: Mapping[str, Any], seen: Observation) -> str:
    """The state the job is in now. Training means the current gang's step moved; a gang that
    trained before an operator restart keeps training until it is seen to stop."""
    if seen.finished:
        return FINISHED
    if seen.suspended:
        return SUSPENDED
    recovering = bool(previous.get("failedAt")) or seen.restarted
    if seen.running and not seen.restarted:
        trained = (
            previous.get("state") == TRAINING and previous.get("generation") == seen.generation
        )
        if seen.advanced or trained:
            return TRAINING
    if recovering:
        return RESTARTING
    return STARTING if seen.admitted else QUEUED


def ettr(goodput: Mapping[str, Any]) -> float:
    """productiveSeconds over the seconds the job held (or was getting back) its gang."""
    held = sum(
        _number(goodput.get(k)) for k in ("startingSeconds", "trainingSeconds", "restartSeconds")
    )
    return min(1.0, _number(goodput.get("productiveSeconds")) / held) if held > 0 else 0.0


def account(previous: Mapping[str, Any] | None, seen: Observation, now: datetime) -> dict[str, Any]:
    """`status.goodput` after this pass: the time since the last pass folded into the state the
    job was in, lost work booked on a restart, the new state and the derived ratio."""
    g: dict[str, Any] = dict(previous or {})
    for key in TOTALS:
        g[key] = _number(g.get(key))
    g["lostSteps"] = int(_number(g.get("lostSteps")))
    g["recoveries"] = int(_number(g.get("recoveries")))
    last = parse(g.get("accountedAt"))
    elapsed = max(0.0, (now - last).total_seconds()) if last is not None else 0.0
    bucket = BUCKETS.get(str(g.get("state") or ""))
    if bucket is not None:
        g[bucket] += elapsed
        if bucket == "trainingSeconds":
            g["gangTrainingSeconds"] = _number(g.get("gangTrainingSeconds")) + elapsed

    if g.get("generation") != seen.generation and not seen.restarted:
        _new_gang(g, seen.generation)  # re-queued after a gang timeout, or resumed
    if seen.step is not None and seen.step != g.get("lastStep"):
        g["lastStep"] = seen.step
        g["lastStepAt"] = stamp(min(seen.stepped_at or now, now))
        if g.get("gangStartStep") is None:
            g["gangStartStep"] = seen.step
    if seen.checkpoint_step is not None:
        g["checkpointStep"] = seen.checkpoint_step
    if seen.step_seconds is not None and seen.step_seconds > 0:
        g["stepSeconds"] = seen.step_seconds
    if seen.checkpoint_stall_seconds is not None:
        before = _number(g.get("gangStallSeconds"))
        total = seen.checkpoint_stall_seconds
        # The trainer's total restarts with each process; a smaller total is a new one.
        g["checkpointSeconds"] += total - before if total >= before else total
        g["gangStallSeconds"] = total

    if seen.restarted:
        _book_lost_work(g, now, seen.hang_seconds or 0.0)
        g["failedAt"] = stamp(now)
        _new_gang(g, seen.generation)

    state = state_of(g, seen)
    if state == TRAINING and g.get("failedAt"):
        failed = parse(g["failedAt"])
        if failed is not None:
            g["lastRecoverySeconds"] = round((now - failed).total_seconds(), 3)
        g["recoveries"] += 1
        g["failedAt"] = None
    if state != g.get("state"):
        g["since"] = stamp(now)
    g["state"] = state
    g["generation"] = seen.generation
    g["accountedAt"] = stamp(now)
    productive = g["trainingSeconds"] - g["checkpointSeconds"] - g["lostSeconds"]
    g["productiveSeconds"] = max(0.0, productive)
    for key in (*TOTALS, "gangTrainingSeconds", "gangStallSeconds"):
        if g.get(key) is not None:
            g[key] = round(g[key], 3)
    g["ettr"] = round(ettr(g), 4)
    # The shell writes status as a JSON merge patch, which keeps a nested key it is not told
    # to delete: a field that ends is written as null (and left out when it was never there).
    return {k: v for k, v in g.items() if v is not None or (previous or {}).get(k) is not None}


def _book_lost_work(g: dict[str, Any], now: datetime, hang: float) -> None:
    """The gang's work since its newest checkpoint is recomputed after the restart: the steps
    it reported past the checkpoint, at its step time, and the time since its last reported
    step (work not yet reported, or a hang). At most what the gang trained, and at least the
    stall of the hang that restarted it: its passes may have seen less of it than the poller
    (the training clock ticks at passes, the hang's at polls)."""
    step = g.get("lastStep")
    if not isinstance(step, int):
        return
    checkpoint = g.get("checkpointStep")
    # No checkpoint yet: the whole run so far is recomputed.
    lost_steps = max(0, step - (checkpoint if isinstance(checkpoint, int) else 0))
    trained = _number(g.get("gangTrainingSeconds"))
    advanced = step - int(_number(g.get("gangStartStep")))
    per_step = _number(g.get("stepSeconds")) or (trained / advanced if advanced > 0 else 0.0)
    seen_at = parse(g.get("lastStepAt"))
    silent = max(0.0, (now - seen_at).total_seconds()) if seen_at is not None else 0.0
    g["lostSteps"] += lost_steps
    g["lostSeconds"] += max(hang, min(trained, silent + lost_steps * per_step))


def _new_gang(g: dict[str, Any], generation: int) -> None:
    for key in (
        "lastStep",
        "lastStepAt",
        "gangStartStep",
        "gangTrainingSeconds",
        "gangStallSeconds",
    ):
        g[key] = None
    g["generation"] = generation


def settle(
    previous: Mapping[str, Any] | None, folded: dict[str, Any], others_changed: bool
) -> Mapping[str, Any]:
    """`folded`, or `previous` unchanged when only the running totals moved, the state did not,
    and they were written less than FOLD_SECONDS ago (nothing else in status changed)."""
    if previous is None or others_changed:
        return folded
    same = all(
        previous.get(k) == folded.get(k)
        for k in ("state", "generation", "lostSteps", "recoveries", "failedAt", "lastStep")
    )
    then, now = parse(previous.get("accountedAt")), parse(folded.get("accountedAt"))
    if (
        same
        and then is not None
        and now is not None
        and (now - then).total_seconds() < FOLD_SECONDS
    ):
        return previous
    return folded


def _true(status: Mapping[str, Any], kind: str) -> bool:
    return any(
        c.get("type") == kind and c.get("status") == "True" for c in status.get("conditions") or []
    )


def account_goodput(
    current: Mapping[str, Any],
    planned: Mapping[str, Any],
    gang: GangProgress | None,
    now: datetime,
    hang_seconds: float | None = None,
) -> Mapping[str, Any]:
    """`status.goodput` for the status a pass planned (`planned`) from the one it read
    (`current`) and the polled gang (its reports count only for the gang they came from);
    `hang_seconds` when the pass restarted the gang for a hang."""
    before = int(current.get("gangGeneration") or 1)
    reports = gang if gang is not None and gang.generation == before else None
    leader = (reports.leader if reports is not None else None) or {}
    seen = Observation(
        finished=_true(planned, "Succeeded") or _true(planned, "Failed"),
        suspended=_true(planned, "Suspended"),
        admitted=_true(planned, "Admitted"),
        running=_true(planned, "Running"),
        generation=int(planned.get("gangGeneration") or 1),
        restarted=int(planned.get("restarts") or 0) > int(current.get("restarts") or 0),
        step=reports.step if reports is not None else None,
        stepped_at=reports.stepped_at if reports is not None else None,
        advanced=reports.advanced if reports is not None else False,
        checkpoint_step=report_int(leader.get("lastCheckpointStep")),
        step_seconds=report_seconds(leader.get("stepSeconds")),
        checkpoint_stall_seconds=report_number(leader.get("checkpointStallSeconds")),
        hang_seconds=hang_seconds,
    )
    previous = current.get("goodput")
    previous = previous if isinstance(previous, Mapping) else None
    folded = account(previous, seen, now)
    others = {k: v for k, v in planned.items() if k != "goodput"} != {
        k: v for k, v in current.items() if k != "goodput"
    }
    return settle(previous, folded, others)
