"""The life of an InferenceService, as one pure function: observed world in, a plan out.

`plan_service` combines the model source (`model_source`), group health (`groups`), the
rollout step (`rollout`) and the autoscaler's decision into the pods to create and delete and
the status, for one reconcile. The handler shell applies the plan; nothing here talks to the API
server or reads the clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from phalanx import observe
from phalanx.api.inference import InferenceServiceSpec, InferenceServiceStatusFields
from phalanx.constants import Reason
from phalanx.observe import CreateRejection
from phalanx.render.inference import (
    ModelMount,
    ServiceRef,
    render_client_service,
    render_group,
    render_group_pod,
    render_peers_service,
    selector_string,
    service_url,
    template_revision,
)
from phalanx.status import (
    MODEL_LOADED,
    PROGRESSING,
    READY,
    SCALING_ACTIVE,
    StatusDraft,
)

from .autoscale import Decision
from .groups import Group, group_failure, groups_of
from .model_source import ModelProblem
from .rollout import GroupView, plan_rollout, rollout_bounds

Pod = Mapping[str, Any]


@dataclass(frozen=True)
class ServiceWorld:
    """What the shell observed about one service."""

    pods: Sequence[Pod]
    ready_nodes: frozenset[str]
    model: ModelMount | ModelProblem
    verdict: tuple[str, str] | None = None  # latest admission verdict of a waiting group
    decision: Decision | None = None  # the autoscaler's, when autoscaling is on
    rejection: CreateRejection | None = None  # the API server's last refusal of a pod


@dataclass
class ServicePlan:
    """What the shell should do, in this order: deletes, creates, scale, status, events."""

    status: InferenceServiceStatusFields
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    scale_to: int | None = None
    # The client and peers Services, applied each pass (unchanged ones are skipped).
    children: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None

    def later(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )


def _unschedulable(pods: Sequence[Pod]) -> str | None:
    for pod in pods:
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                return f"pod {observe.name(pod)}: {condition.get('message') or 'unschedulable'}"
    return None


def plan_service(
    ref: ServiceRef,
    spec: InferenceServiceSpec,
    metadata_generation: int | None,
    current_status: Mapping[str, Any],
    world: ServiceWorld,
    now: datetime,
) -> ServicePlan:
    """Decide the next step of a service from its spec, its status and the observed world."""
    cond = StatusDraft[InferenceServiceStatusFields](current_status, now, metadata_generation)
    data = cond.data
    data["observedGeneration"] = metadata_generation
    data["selector"] = selector_string(ref.name)
    data["url"] = service_url(ref)
    plan = ServicePlan(status=data, children=[
        render_client_service(ref, spec), render_peers_service(ref, spec)
    ])  # fmt: skip
    size = spec.nodes_per_replica
    desired = spec.replicas

    groups = groups_of(world.pods)
    leaving = [g for g in groups.values() if g.leaving()]
    live = [g for g in groups.values() if not g.leaving()]
    model = world.model
    revision = template_revision(spec, model) if isinstance(model, ModelMount) else ""
    if revision:
        data["revision"] = revision
        data["modelRevision"] = model.revision if isinstance(model, ModelMount) else ""
    if data.get("stalledRevision") and data.get("stalledRevision") != revision and revision:
        data["stalledRevision"] = ""  # a new revision is a fresh attempt
    old_exist = bool(revision) and any(g.revision != revision for g in live)

    # A group that lost a member is recreated whole; a broken new revision stalls the rollout.
    deleted: set[int] = set()
    for group in live:
        reason = group_failure(group, size, world.ready_nodes)
        if reason is None:
            continue
        deleted.add(group.index)
        plan.delete += [observe.name(p) for p in group.pods if not observe.terminating(p)]
        if old_exist and group.revision == revision:
            data["stalledRevision"] = revision
            cond.set(
                PROGRESSING, False, Reason.ROLLOUT_STALLED,
                f"Group {group.index} of the new revision failed: {reason}. The rollout stopped "
                "and the old groups keep serving; fix the spec or the model to roll again.",
                warn=True,
            )  # fmt: skip
        else:
            cond.events.append(
                (
                    "Warning",
                    Reason.GROUP_RECREATED,
                    f"Group {group.index}: {reason}; recreating it.",
                )
            )

    # New-revision groups that never became ready in time stall the rollout too.
    deadline = timedelta(seconds=spec.rollout.progress_deadline_seconds)
    if old_exist and data.get("stalledRevision") != revision:
        for group in live:
            created = group.created()
            if group.index in deleted or group.revision != revision or created is None:
                continue
            if group.ready(size):
                continue
            if now - created >= deadline:
                data["stalledRevision"] = revision
                cond.set(
                    PROGRESSING, False, Reason.ROLLOUT_STALLED,
                    f"Group {group.index} of the new revision was not ready within "
                    f"{spec.rollout.progress_deadline_seconds}s; the old groups keep serving.",
                    warn=True,
                )  # fmt: skip
            else:
                plan.later((created + deadline - now).total_seconds())

    stalled = bool(revision) and data.get("stalledRevision") == revision
    survivors = [g for g in live if g.index not in deleted]
    if isinstance(model, ModelMount):
        # A partly created gang (the operator stopped midway) is completed, unless it is old.
        for group in survivors:
            workers = group.workers()
            if (
                len(workers) < size
                and all(observe.gated(p) for p in group.pods)
                and group.revision == revision
            ):
                plan.create += [
                    render_group_pod(ref, spec, model, group.index, w, revision)
                    for w in range(size)
                    if w not in workers
                ]
        views = [GroupView(g.index, g.revision, g.ready(size)) for g in survivors]
        surge, unavailable = rollout_bounds(spec, desired)
        step = plan_rollout(
            desired,
            revision,
            views,
            surge,
            unavailable,
            stalled=stalled,
            taken=[*deleted, *(g.index for g in leaving)],
        )
        by_index = {g.index: g for g in survivors}
        for index in step.delete:
            plan.delete += [
                observe.name(p) for p in by_index[index].pods if not observe.terminating(p)
            ]
        for index in step.create:
            plan.create += render_group(ref, spec, model, index, revision)
        remaining = [g for g in survivors if g.index not in step.delete]
    else:
        # Without a resolvable model nothing new starts; groups already serving keep serving.
        remaining = survivors
    plan.delete = sorted(set(plan.delete))
    rejected = world.rejection
    held = bool(plan.create) and rejected is not None and rejected.holds(now, metadata_generation)
    if held:
        # Creating again now would only repeat the API server's refusal: back off.
        assert rejected is not None
        plan.create = []
        plan.later((rejected.retry_at() - now).total_seconds())

    ready = [g for g in remaining if g.ready(size)]
    updated = [g for g in remaining if g.revision == revision]
    data["replicas"] = len(remaining)
    data["readyReplicas"] = len(ready)
    data["updatedReplicas"] = len(updated)
    _model_condition(cond, model, ready, revision)
    if held and rejected is not None:
        cond.set(PROGRESSING, False, Reason.POD_CREATE_REJECTED, rejected.describe(), warn=True)
    else:
        _progress_condition(
            cond, spec, model, remaining, ready, revision, stalled, bool(plan.create)
        )
    _ready_condition(cond, spec, model, world, remaining, ready, stalled, held)
    _scaling(cond, plan, spec, world.decision)
    plan.events = cond.events
    return plan


def _model_condition(
    cond: StatusDraft[InferenceServiceStatusFields],
    model: ModelMount | ModelProblem,
    ready: Sequence[Group],
    revision: str,
) -> None:
    if isinstance(model, ModelProblem):
        cond.set(MODEL_LOADED, False, model.reason, model.message, warn=True)
        return
    serving = [g for g in ready if g.revision == revision]
    if serving:
        cond.set(
            MODEL_LOADED, True, Reason.LOADED,
            f"{model.revision} is loaded and healthy in {len(serving)} group(s).",
        )  # fmt: skip
    else:
        cond.set(
            MODEL_LOADED, False, Reason.LOADING,
            f"Waiting for {model.revision} to load (the server's /health answers 200 once it has).",
        )  # fmt: skip


def _progress_condition(
    cond: StatusDraft[InferenceServiceStatusFields],
    spec: InferenceServiceSpec,
    model: ModelMount | ModelProblem,
    remaining: Sequence[Group],
    ready: Sequence[Group],
    revision: str,
    stalled: bool,
    creating: bool,
) -> None:
    if stalled:
        return  # RolloutStalled was set with its cause when the rollout stopped
    if isinstance(model, ModelProblem):
        cond.set(PROGRESSING, False, model.reason, model.message)
        return
    desired = spec.replicas
    old = [g for g in remaining if g.revision != revision]
    if old:
        updated = len(remaining) - len(old)
        cond.set(
            PROGRESSING, True, Reason.ROLLING_UPDATE,
            f"{updated} of {desired} group(s) at revision {revision}; {len(old)} old group(s) left.",
        )  # fmt: skip
    elif creating or len(remaining) != desired or len(ready) != desired:
        cond.set(
            PROGRESSING, True, Reason.SCALING,
            f"{len(ready)} of {desired} group(s) ready ({len(remaining)} exist).",
        )  # fmt: skip
    else:
        cond.set(
            PROGRESSING, False, Reason.ROLLOUT_COMPLETE,
            f"All {desired} group(s) run revision {revision} and are ready.",
        )  # fmt: skip


def _ready_condition(
    cond: StatusDraft[InferenceServiceStatusFields],
    spec: InferenceServiceSpec,
    model: ModelMount | ModelProblem,
    world: ServiceWorld,
    remaining: Sequence[Group],
    ready: Sequence[Group],
    stalled: bool,
    held: bool = False,
) -> None:
    desired = spec.replicas
    _, unavailable = rollout_bounds(spec, desired)
    floor = max(desired - unavailable, 1)
    if desired == 0:
        cond.set(READY, False, Reason.SCALED_TO_ZERO, "spec.replicas is 0; scale up to serve.")
        return
    if len(ready) >= floor:
        cond.set(
            READY, True, Reason.MINIMUM_REPLICAS_AVAILABLE,
            f"{len(ready)} of {desired} group(s) ready behind the Service.",
        )  # fmt: skip
        return
    pods = [p for g in remaining for p in g.pods]
    problem = next((found for p in pods if (found := observe.start_problem(p))), None)
    looping = next((loop for p in pods if (loop := observe.crash_loop(p))), None)
    if isinstance(model, ModelProblem):
        reason, message = model.reason, model.message
    elif held and world.rejection is not None:
        reason, message = Reason.POD_CREATE_REJECTED, world.rejection.describe()
    elif problem is not None:
        reason = problem.condition_reason
        message = f"{problem.describe()}. {problem.remedy}"
    elif looping is not None:
        reason = Reason.CRASH_LOOP_BACK_OFF
        message = f"{looping.describe()}. See the server's log (kubectl logs --previous)."
    elif world.verdict is not None:
        reason, message = world.verdict
        message = f"A group of {spec.nodes_per_replica} pods cannot be placed: {message}"
    elif (unschedulable := _unschedulable(pods)) is not None:
        reason, message = (
            Reason.UNSCHEDULABLE,
            f"{unschedulable}. Free capacity or change the spec.",
        )
    elif stalled:
        reason, message = (
            Reason.ROLLOUT_STALLED,
            "The new revision fails; see the Progressing condition.",
        )
    else:
        reason = Reason.GROUPS_STARTING
        message = f"{len(ready)} of {desired} group(s) ready; waiting for {floor}."
    cond.set(READY, False, reason, message, warn=reason != Reason.GROUPS_STARTING)


def _scaling(
    cond: StatusDraft[InferenceServiceStatusFields],
    plan: ServicePlan,
    spec: InferenceServiceSpec,
    decision: Decision | None,
) -> None:
    if spec.autoscaling is None:
        plan.status.pop("desiredReplicas", None)
        cond.set(
            SCALING_ACTIVE, False, Reason.AUTOSCALING_DISABLED,
            "spec.autoscaling is not set; spec.replicas is driven by kubectl scale, HPA or KEDA.",
        )  # fmt: skip
        return
    if decision is None or decision.reason == Reason.NO_METRICS:
        cond.set(
            SCALING_ACTIVE, False, Reason.NO_METRICS,
            "No recent load samples from ready leaders; the replica count is kept.",
        )  # fmt: skip
        if decision is None:
            return
    else:
        cond.set(SCALING_ACTIVE, True, Reason.METRICS_AVAILABLE, decision.message)
    plan.status["desiredReplicas"] = decision.desired
    if decision.desired != spec.replicas:
        plan.scale_to = decision.desired
