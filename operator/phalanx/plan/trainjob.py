"""The life of an LLMTrainJob, as one pure function: observed world in, a plan out.

`plan_trainjob` answers "what should happen now?" for one job: which pods to create or delete,
what the status says, whether to restart the gang after a rank died, when to look again. It
reads as the recipe: the end, suspend/resume, the deadline, failed ranks
(`failure_policy`), success, the old gang's departure, then creation and admission of the
current gang; the clock-driven rules live in `lifetime`. The handler shell applies the plan;
nothing here talks to the API server or reads the clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from phalanx import observe
from phalanx.api.trainjob import FailureRule, LLMTrainJobSpec, LLMTrainJobStatusFields
from phalanx.constants import Reason
from phalanx.observe import CreateRejection
from phalanx.render.trainjob import CONTAINER, JobRef, render_children, render_pod
from phalanx.status import (
    ADMITTED,
    FAILED,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    StatusDraft,
    progress_status,
    timestamp,
    trainjob_phase,
)

from .failure_policy import (
    RankFailure,
    failure_action,
    failure_verdict,
    rank_failure,
    start_failure,
)
from .lifetime import deadline_left, stuck_terminating, ttl_left


@dataclass(frozen=True)
class World:
    """What the shell observed about one job: its pods, node health, admission and progress."""

    pods: Sequence[Mapping[str, Any]]
    ready_nodes: frozenset[str]
    verdict: tuple[str, str] | None = None  # (reason, message) from the admission loop
    progress: Mapping[str, Any] | None = None
    rejection: CreateRejection | None = None  # the API server's last refusal of a pod


@dataclass
class Plan:
    """What the shell should do for one job, in this order: deletes, creates, status, events."""

    status: LLMTrainJobStatusFields
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    force_delete: list[str] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    # Every non-pod child, applied each pass (server-side apply skips what is unchanged).
    children: list[dict[str, Any]] = field(default_factory=list)
    requeue_after: float | None = None
    delete_job: bool = False

    def later(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )


def plan_trainjob(
    ref: JobRef,
    spec: LLMTrainJobSpec,
    metadata_generation: int | None,
    current_status: Mapping[str, Any],
    world: World,
    now: datetime,
) -> Plan:
    """Decide the next step of a job from its spec, its status and the observed world."""
    plan = _decide(ref, spec, metadata_generation, current_status, world, now)
    # The rank table describes the gang the status now names (initializing until every
    # rank's devices are known, so a new gang starts from a fresh table).
    generation = int(plan.status.get("gangGeneration") or 1)
    gang = {observe.rank(p): p for p in world.pods if observe.generation(p) == generation}
    plan.children = render_children(ref, spec, [gang.get(r) for r in range(spec.nodes)])
    return plan


def _decide(
    ref: JobRef,
    spec: LLMTrainJobSpec,
    metadata_generation: int | None,
    current_status: Mapping[str, Any],
    world: World,
    now: datetime,
) -> Plan:
    st = StatusDraft[LLMTrainJobStatusFields](
        current_status, now, metadata_generation, announce=frozenset({ADMITTED})
    )
    plan = Plan(status=st.data)
    st.data["observedGeneration"] = metadata_generation
    st.data.setdefault("restarts", 0)
    generation = int(st.data.get("gangGeneration") or 1)
    st.data["gangGeneration"] = generation
    pods = list(world.pods)

    if st.is_true(SUCCEEDED) or st.is_true(FAILED):
        _finished(spec, pods, st, plan)
        return _finish(plan, st, pods)

    if spec.run_policy.suspend:
        plan.delete += [p["metadata"]["name"] for p in pods if not observe.terminating(p)]
        _force_stuck(pods, world.ready_nodes, now, plan)
        st.set(
            SUSPENDED,
            True,
            Reason.SUSPENDED,
            "Pods deleted; the checkpoint volume is kept. Set spec.runPolicy.suspend to false to resume.",
        )
        st.clear(RUNNING, Reason.SUSPENDED, "The job is suspended.")
        st.clear(ADMITTED, Reason.SUSPENDED, "The job is suspended.")
        st.data.pop("placement", None)
        st.data["accelerators"] = 0
        return _finish(plan, st, pods)
    if st.is_true(SUSPENDED):
        st.set(SUSPENDED, False, Reason.RESUMED, "The job was resumed; a new gang is queued.")
        generation = _next_generation(st, generation)

    remaining = deadline_left(spec, st.data, now)
    if remaining is not None and remaining <= 0:
        deadline = spec.run_policy.active_deadline_seconds
        message = f"The job ran longer than activeDeadlineSeconds ({deadline}s)."
        _fail(st, plan, pods, Reason.DEADLINE_EXCEEDED, message)
        return _finish(plan, st, pods)
    if remaining is not None:
        plan.later(remaining)

    old = [p for p in pods if observe.generation(p) != generation]
    current = {observe.rank(p): p for p in pods if observe.generation(p) == generation}

    # A rank that can no longer finish decides the fate of the whole gang.
    failures = [f for f in (rank_failure(p, world.ready_nodes) for p in current.values()) if f]
    rules = spec.failure_policy.rules
    ignored = {f.rank for f in failures if failure_action(f, rules) == "Ignore"}
    fatal = [f for f in failures if failure_action(f, rules) == "FailJob"]
    restart = [f for f in failures if f.rank not in ignored and f not in fatal]
    if fatal:
        _fail_permanently(st, plan, pods, fatal[0], rules)
        return _finish(plan, st, pods)
    admitted_pods = [p for p in current.values() if not observe.gated(p)]
    missing = [r for r in range(spec.nodes) if r not in current]
    if missing and admitted_pods and not old:
        # A rank vanished from an admitted gang: its peers cannot finish without it.
        restart.append(
            RankFailure(missing[0], f"{ref.name}-{missing[0]}", "", None, (Reason.POD_MISSING,))
        )
    if restart:
        _restart(spec, st, plan, pods, restart[0], generation)
        _force_stuck(pods, world.ready_nodes, now, plan)
        return _finish(plan, st, pods)

    finished = [r for r, p in current.items() if observe.phase(p) == "Succeeded" or r in ignored]
    if len(current) == spec.nodes and len(finished) == spec.nodes:
        st.set(
            SUCCEEDED,
            True,
            Reason.ALL_RANKS_SUCCEEDED,
            f"All {spec.nodes} ranks completed successfully.",
        )
        st.clear(RUNNING, Reason.COMPLETED, "The job completed.")
        st.data["completionTime"] = timestamp(now)
        # Only what rank 0 reported is an export: its final termination message says what it
        # published (a user image that reports nothing has exported nothing we know of).
        if 0 in current:
            report = observe.termination(current[0], CONTAINER).report
            if report is not None:
                _copy_exports(st.data, report.export_path, report.export_steps)
                if report.progress is not None:
                    st.data["progress"] = progress_status(report.progress)
        _finished(spec, pods, st, plan)
        return _finish(plan, st, pods)

    if old:
        # The previous gang must be gone before its names and capacity are reused.
        plan.delete += [p["metadata"]["name"] for p in old if not observe.terminating(p)]
        _force_stuck(old, world.ready_nodes, now, plan)
        plan.later(1)
        return _finish(plan, st, pods)

    rejected = world.rejection
    if missing and rejected is not None and rejected.holds(now, metadata_generation):
        # Creating again now would only repeat the API server's refusal: back off.
        st.set(ADMITTED, False, Reason.POD_CREATE_REJECTED, rejected.describe(), warn=True)
        plan.later((rejected.retry_at() - now).total_seconds())
        return _finish(plan, st, pods)
    if missing:
        plan.create += [render_pod(ref, spec, rank, generation) for rank in missing]
        st.data.setdefault("startTime", timestamp(now))
        st.data.setdefault("queuedAt", timestamp(now))

    _admission(spec, st, plan, list(current.values()), world, now, missing, set(finished))
    if world.progress is not None and st.is_true(RUNNING):
        st.data["progress"] = progress_status(world.progress)
        _copy_exports(
            st.data,
            observe.export_path(world.progress.get("exportPath")),
            observe.export_steps(world.progress.get("exportSteps")),
        )
    return _finish(plan, st, pods)


def _copy_exports(
    status: LLMTrainJobStatusFields, path: str | None, steps: tuple[int, ...] | None
) -> None:
    """status.exportPath / exportSteps from what the trainer reported (absent: left as is)."""
    if path is not None:
        status["exportPath"] = path
    if steps is not None:
        status["exportSteps"] = list(steps)


def _fail_permanently(
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
    pods: list[Mapping[str, Any]],
    failure: RankFailure,
    rules: Sequence[FailureRule],
) -> None:
    _, why = failure_verdict(failure, rules)
    _fail(
        st, plan, pods, Reason.PERMANENT_FAILURE, f"{failure.describe()}; {why}, so the job failed."
    )


def _admission(
    spec: LLMTrainJobSpec,
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
    pods: list[Mapping[str, Any]],
    world: World,
    now: datetime,
    missing: list[int],
    finished: set[int],
) -> None:
    """Admitted / Running conditions, and the gang timeout of a placed but stuck gang."""
    builtin = spec.run_policy.gang_scheduler == "builtin"
    complete = not missing and len(pods) == spec.nodes
    gated = [p for p in pods if observe.gated(p)]
    if complete and not gated:
        placement = st.data.get("placement") or {}
        where = (
            f" in {placement.get('level')} {placement.get('domain')}"
            if placement.get("domain")
            else ""
        )
        reason = Reason.GANG_ADMITTED if builtin else Reason.SCHEDULER_MANAGED
        st.set(ADMITTED, True, reason, f"{spec.nodes} pods placed{where}.")
        st.data["accelerators"] = spec.nodes * spec.accelerator.count()
    elif world.verdict is not None:
        reason, message = world.verdict
        st.set(ADMITTED, False, reason, message, warn=True)
    else:
        st.set(
            ADMITTED,
            False,
            Reason.QUEUED,
            f"Waiting for capacity for {spec.nodes} pods in one domain.",
        )

    running = [p for p in pods if observe.running(p) or observe.rank(p) in finished]
    if complete and len(running) == spec.nodes:
        st.set(RUNNING, True, Reason.ALL_RANKS_RUNNING, f"All {spec.nodes} ranks are running.")
        st.clear(RESTARTING, Reason.GANG_RUNNING, "The restarted gang is running.")
        return
    timeout = spec.failure_policy.gang_timeout_seconds
    stuck = [p for p in pods if p not in running]
    problems = [found for p in stuck if (found := observe.start_problem(p)) is not None]
    if complete and not gated and problems:
        st.set(
            RUNNING, False, problems[0].condition_reason,
            f"{problems[0].describe()}. Fix spec.image, the pull secret or the referenced "
            f"ConfigMap/Secret; unless it clears, the gang restarts {timeout}s after placement "
            "(counted against failurePolicy.maxRestarts).",
            warn=True,
        )  # fmt: skip
    admitted_at = observe.parse_time(st.data.get("admittedAt"))
    if builtin and complete and not gated and admitted_at is not None:
        waited = (now - admitted_at).total_seconds()
        if waited >= timeout and problems:
            # A gang that cannot start its containers would be re-queued forever; as a rank
            # failure it meets the failure rules and the restart limit instead.
            problem = problems[0]
            pod = next(p for p in pods if observe.name(p) == problem.pod)
            failure = start_failure(pod, problem)
            if failure_action(failure, spec.failure_policy.rules) == "FailJob":
                _fail_permanently(st, plan, pods, failure, spec.failure_policy.rules)
            else:
                _restart(spec, st, plan, pods, failure, int(st.data["gangGeneration"]))
            return
        if waited >= timeout:
            names = ", ".join(f"{p['metadata']['name']} ({_pending_reason(p)})" for p in stuck[:5])
            plan.delete += [p["metadata"]["name"] for p in pods if not observe.terminating(p)]
            st.set(
                ADMITTED,
                False,
                Reason.GANG_TIMEOUT,
                f"Not all pods were running {timeout}s after placement: {names}; the gang was re-queued.",
                warn=True,
            )
            _next_generation(st, int(st.data["gangGeneration"]))
            return
        plan.later(timeout - waited)


def _pending_reason(pod: Mapping[str, Any]) -> str:
    return observe.unschedulable_message(pod) or observe.phase(pod)


def _next_generation(st: StatusDraft[LLMTrainJobStatusFields], generation: int) -> int:
    st.data["gangGeneration"] = generation + 1
    st.data.pop("placement", None)
    st.data.pop("admittedAt", None)
    st.data.pop("queuedAt", None)
    st.data["accelerators"] = 0
    return generation + 1


def _restart(
    spec: LLMTrainJobSpec,
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
    pods: list[Mapping[str, Any]],
    failure: RankFailure,
    generation: int,
) -> None:
    restarts = int(st.data.get("restarts") or 0)
    limit = spec.failure_policy.max_restarts
    if restarts >= limit:
        _fail(
            st,
            plan,
            pods,
            Reason.RESTART_LIMIT_EXCEEDED,
            f"{failure.describe()}; the gang already restarted {restarts} times (maxRestarts {limit}).",
        )
        return
    st.data["restarts"] = restarts + 1
    plan.delete += [p["metadata"]["name"] for p in pods if not observe.terminating(p)]
    st.set(
        RESTARTING,
        True,
        Reason.RANK_FAILED,
        f"{failure.describe()}; restarting the whole gang from the newest checkpoint (restart {restarts + 1} of {limit}).",
        warn=True,
    )
    st.clear(RUNNING, Reason.RANK_FAILED, failure.describe())
    st.clear(ADMITTED, Reason.GANG_RESTARTING, "The gang is being recreated.")
    _next_generation(st, generation)


def _fail(
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
    pods: list[Mapping[str, Any]],
    reason: str,
    message: str,
) -> None:
    st.set(FAILED, True, reason, message, warn=True)
    st.clear(RUNNING, reason, message)
    st.clear(RESTARTING, reason, message)
    st.data["completionTime"] = timestamp(st.now)
    plan.delete += [
        p["metadata"]["name"]
        for p in pods
        if observe.phase(p) not in ("Succeeded", "Failed") and not observe.terminating(p)
    ]


def _finished(
    spec: LLMTrainJobSpec,
    pods: list[Mapping[str, Any]],
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
) -> None:
    """After the end: stop stragglers (logs of finished pods stay), then honour the TTL."""
    plan.delete += [
        p["metadata"]["name"]
        for p in pods
        if observe.phase(p) not in ("Succeeded", "Failed") and not observe.terminating(p)
    ]
    st.data["accelerators"] = 0
    remaining = ttl_left(spec, st.data, st.now)
    if remaining is not None and remaining <= 0:
        plan.delete_job = True
    elif remaining is not None:
        plan.later(remaining)


def _force_stuck(
    pods: Sequence[Mapping[str, Any]], ready_nodes: frozenset[str], now: datetime, plan: Plan
) -> None:
    force, wait = stuck_terminating(pods, ready_nodes, now)
    plan.force_delete += force
    if wait is not None:
        plan.later(wait)


def _finish(
    plan: Plan, st: StatusDraft[LLMTrainJobStatusFields], pods: Sequence[Mapping[str, Any]]
) -> Plan:
    plan.status = st.data
    st.data["phase"] = trainjob_phase(st.conditions, bool(pods) or bool(plan.create))
    plan.events = st.events
    plan.delete = sorted(set(plan.delete))
    return plan
