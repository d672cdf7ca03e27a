"""The life of an InferenceService, as pure functions: observed world in, a plan out.

- `resolve_model`: which model the spec points at, or why it cannot be served yet.
- `group_failure`: why a group of pods can no longer serve (the whole group is recreated).
- `plan_rollout`: which groups to create and delete to reach `replicas` groups at the target
  revision without dropping below the available floor or rising above the surge ceiling.
- `plan_service`: all of the above plus the status, for one reconcile.

The handler shell applies the plan; nothing here talks to the API server or reads the clock.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from phalanx import observe
from phalanx.api.inference import InferenceServiceSpec
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError, parse
from phalanx.autoscaler import Decision
from phalanx.constants import GANG_GATE, LABEL_GROUP_INDEX, LABEL_WORKER_INDEX
from phalanx.observe import CreateRejection
from phalanx.render.inference import (
    LABEL_REVISION,
    MODEL_DIR,
    ModelMount,
    ServiceRef,
    render_group,
    render_group_pod,
    selector_string,
    service_url,
    template_revision,
)
from phalanx.render.trainjob import checkpoint_claim_name
from phalanx.status import (
    MODEL_LOADED,
    PROGRESSING,
    READY,
    SCALING_ACTIVE,
    Condition,
    set_condition,
)

Pod = Mapping[str, Any]


@dataclass(frozen=True)
class ModelProblem:
    """Why the model cannot be served (yet): a condition reason and what to do about it."""

    reason: str
    message: str


def resolve_model(
    spec: InferenceServiceSpec,
    trainjob: Mapping[str, Any] | None,
    claims: frozenset[str] | None,
) -> ModelMount | ModelProblem:
    """The model to serve, from the spec and (for fromTrainJob) the job as the cache holds it.

    `claims` are the claim names that exist in the namespace, or None when not known yet.
    """
    source = spec.model
    if source.builtin is not None:
        return ModelMount(path=f"builtin:{source.builtin}", revision=f"builtin:{source.builtin}")
    if source.claim is not None:
        claim = source.claim
        if claims is not None and claim.name not in claims:
            return ModelProblem(
                "ClaimNotFound",
                f"PersistentVolumeClaim {claim.name} does not exist; create it or fix "
                "spec.model.claim.name.",
            )
        path = f"{MODEL_DIR}/{claim.path.strip('/')}".rstrip("/")
        return ModelMount(
            path=path, revision=f"claim:{claim.name}/{claim.path.strip('/')}", claim=claim.name
        )
    assert source.from_train_job is not None  # the API allows exactly one source
    wanted = source.from_train_job
    if trainjob is None:
        return ModelProblem(
            "TrainJobNotFound",
            f"LLMTrainJob {wanted.name} does not exist in this namespace; create it or fix "
            "spec.model.fromTrainJob.name.",
        )
    try:
        job: LLMTrainJob = parse(dict(trainjob), LLMTrainJob)
    except SpecError as error:
        return ModelProblem("TrainJobInvalid", f"LLMTrainJob {wanted.name} is invalid: {error}")
    claim_name = checkpoint_claim_name(wanted.name, job.spec)
    if claim_name is None:
        return ModelProblem(
            "TrainJobHasNoCheckpoint",
            f"LLMTrainJob {wanted.name} keeps no checkpoint volume (checkpoint.enabled: false), "
            "so its export is lost; serve a claim or a job with a checkpoint volume.",
        )
    if claims is not None and claim_name not in claims:
        return ModelProblem(
            "ClaimNotFound",
            f"The checkpoint claim {claim_name} of LLMTrainJob {wanted.name} does not exist.",
        )
    status = trainjob.get("status") or {}
    uid = str(trainjob.get("metadata", {}).get("uid") or "")[:8]
    if wanted.step is not None:
        # exports/step-N is a servable snapshot the trainer publishes atomically (COMPLETE
        # written last) and reports in exportSteps; checkpoints themselves are shards.
        steps = [s for s in status.get("exportSteps") or [] if isinstance(s, int)]
        if wanted.step not in steps:
            listed = ", ".join(str(s) for s in steps) if steps else "none yet"
            return ModelProblem(
                "ExportNotReady",
                f"LLMTrainJob {wanted.name} has not reported an export of step {wanted.step} "
                f"(export steps: {listed}); waiting. Steps are exported every "
                "spec.trainer.exportEvery steps.",
            )
        directory = f"exports/step-{wanted.step}"
    else:
        export = status.get("exportPath")
        if status.get("phase") != "Succeeded" or not export:
            phase = status.get("phase") or "Pending"
            detail = (
                "it succeeded but its trainer reported no export (exportPath)"
                if phase == "Succeeded"
                else f"phase {phase}; the model is served once the job succeeds"
            )
            return ModelProblem(
                "ExportNotReady", f"LLMTrainJob {wanted.name} has no export yet ({detail})."
            )
        directory = str(export).strip("/")
    return ModelMount(
        path=f"{MODEL_DIR}/{directory}",
        revision=f"{wanted.name}/{directory}@{uid}",
        claim=claim_name,
    )


# --- groups ------------------------------------------------------------------------------


def _labels(pod: Pod) -> Mapping[str, str]:
    return pod.get("metadata", {}).get("labels") or {}


def _int_label(pod: Pod, key: str) -> int:
    try:
        return int(_labels(pod)[key])
    except (KeyError, ValueError, TypeError):
        return -1


def _name(pod: Pod) -> str:
    return str(pod.get("metadata", {}).get("name", ""))


def _terminating(pod: Pod) -> bool:
    return bool(pod.get("metadata", {}).get("deletionTimestamp"))


def _gated(pod: Pod) -> bool:
    return any(g.get("name") == GANG_GATE for g in pod.get("spec", {}).get("schedulingGates") or [])


def pod_ready(pod: Pod) -> bool:
    status = pod.get("status") or {}
    return (
        status.get("phase") == "Running"
        and not _terminating(pod)
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
    )


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Group:
    """The observed pods of one replica."""

    index: int
    pods: tuple[Pod, ...]

    @property
    def revision(self) -> str:
        revisions = {_labels(p).get(LABEL_REVISION, "") for p in self.pods}
        return revisions.pop() if len(revisions) == 1 else ""

    def workers(self) -> dict[int, Pod]:
        return {_int_label(p, LABEL_WORKER_INDEX): p for p in self.pods}

    def leaving(self) -> bool:
        """Every pod is being deleted: the group is on its way out (its index stays taken)."""
        return all(_terminating(p) for p in self.pods)

    def ready(self, size: int) -> bool:
        return len(self.pods) == size and all(pod_ready(p) for p in self.pods)

    def created(self) -> datetime | None:
        times = [_parse_time(p.get("metadata", {}).get("creationTimestamp")) for p in self.pods]
        known = [t for t in times if t is not None]
        return min(known) if known else None


def groups_of(pods: Sequence[Pod]) -> dict[int, Group]:
    by_index: dict[int, list[Pod]] = {}
    for pod in pods:
        by_index.setdefault(_int_label(pod, LABEL_GROUP_INDEX), []).append(pod)
    return {
        index: Group(index, tuple(sorted(members, key=_name)))
        for index, members in sorted(by_index.items())
    }


def _termination(pod: Pod) -> str:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            code = terminated.get("exitCode")
            return f"exit code {code}" if code is not None else str(terminated.get("reason"))
    return str((pod.get("status") or {}).get("reason") or "Failed")


def group_failure(group: Group, size: int, ready_nodes: frozenset[str]) -> str | None:
    """Why this group can no longer serve as a whole, or None while it still can."""
    for pod in group.pods:
        status = pod.get("status") or {}
        node = str(pod.get("spec", {}).get("nodeName") or "")
        if status.get("phase") in ("Failed", "Succeeded"):
            return f"pod {_name(pod)} ended ({status.get('phase')}, {_termination(pod)})"
        if node and node not in ready_nodes:
            return f"pod {_name(pod)} lost its node {node}"
        if _terminating(pod):
            return f"pod {_name(pod)} was deleted"
        if size > 1:
            for container in status.get("containerStatuses") or []:
                if int(container.get("restartCount") or 0) > 0:
                    # Peers of a multi-host engine cannot rejoin a restarted member.
                    return f"a container of pod {_name(pod)} restarted"
    if len(group.pods) < size and any(not _gated(p) for p in group.pods):
        missing = sorted(set(range(size)) - set(group.workers()))
        return f"worker {missing[0] if missing else '?'} of an admitted group is missing"
    return None


# --- rollout -----------------------------------------------------------------------------


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


# --- the whole reconcile -----------------------------------------------------------------


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

    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    scale_to: int | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None

    def later(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )


class _Conditions:
    """Condition edits on the status being built; real changes of interest become events."""

    def __init__(self, data: dict[str, Any], now: datetime, generation: int | None) -> None:
        self.data = data
        self.now = now
        self.generation = generation
        self.events: list[tuple[str, str, str]] = []

    def set(self, kind: str, status: bool, reason: str, message: str, warn: bool = False) -> None:
        conditions: list[Condition] = self.data.setdefault("conditions", [])
        before = next((c for c in conditions if c.get("type") == kind), None)
        self.data["conditions"], changed = set_condition(
            conditions, kind, status, reason, message, self.now, self.generation
        )
        flipped = before is None or before.get("reason") != reason
        if changed and flipped and (status or warn):
            self.events.append(("Warning" if warn else "Normal", reason, message))


def _unschedulable(pods: Sequence[Pod]) -> str | None:
    for pod in pods:
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                return f"pod {_name(pod)}: {condition.get('message') or 'unschedulable'}"
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
    data: dict[str, Any] = copy.deepcopy(dict(current_status))
    data["observedGeneration"] = metadata_generation
    data["selector"] = selector_string(ref.name)
    data["url"] = service_url(ref)
    cond = _Conditions(data, now, metadata_generation)
    plan = ServicePlan(status=data)
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
        plan.delete += [_name(p) for p in group.pods if not _terminating(p)]
        if old_exist and group.revision == revision:
            data["stalledRevision"] = revision
            cond.set(
                PROGRESSING, False, "RolloutStalled",
                f"Group {group.index} of the new revision failed: {reason}. The rollout stopped "
                "and the old groups keep serving; fix the spec or the model to roll again.",
                warn=True,
            )  # fmt: skip
        else:
            cond.events.append(
                ("Warning", "GroupRecreated", f"Group {group.index}: {reason}; recreating it.")
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
                    PROGRESSING, False, "RolloutStalled",
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
                and all(_gated(p) for p in group.pods)
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
            plan.delete += [_name(p) for p in by_index[index].pods if not _terminating(p)]
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
        cond.set(PROGRESSING, False, "PodCreateRejected", rejected.describe(), warn=True)
    else:
        _progress_condition(
            cond, spec, model, remaining, ready, revision, stalled, bool(plan.create)
        )
    _ready_condition(cond, spec, model, world, remaining, ready, stalled, held)
    _scaling(cond, plan, spec, world.decision)
    plan.events = cond.events
    return plan


def _model_condition(
    cond: _Conditions,
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
            MODEL_LOADED, True, "Loaded",
            f"{model.revision} is loaded and healthy in {len(serving)} group(s).",
        )  # fmt: skip
    else:
        cond.set(
            MODEL_LOADED, False, "Loading",
            f"Waiting for {model.revision} to load (the server's /health answers 200 once it has).",
        )  # fmt: skip


def _progress_condition(
    cond: _Conditions,
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
            PROGRESSING, True, "RollingUpdate",
            f"{updated} of {desired} group(s) at revision {revision}; {len(old)} old group(s) left.",
        )  # fmt: skip
    elif creating or len(remaining) != desired or len(ready) != desired:
        cond.set(
            PROGRESSING, True, "Scaling",
            f"{len(ready)} of {desired} group(s) ready ({len(remaining)} exist).",
        )  # fmt: skip
    else:
        cond.set(
            PROGRESSING, False, "RolloutComplete",
            f"All {desired} group(s) run revision {revision} and are ready.",
        )  # fmt: skip


def _ready_condition(
    cond: _Conditions,
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
        cond.set(READY, False, "ScaledToZero", "spec.replicas is 0; scale up to serve.")
        return
    if len(ready) >= floor:
        cond.set(
            READY, True, "MinimumReplicasAvailable",
            f"{len(ready)} of {desired} group(s) ready behind the Service.",
        )  # fmt: skip
        return
    pods = [p for g in remaining for p in g.pods]
    problem = next((found for p in pods if (found := observe.start_problem(p))), None)
    looping = next((loop for p in pods if (loop := observe.crash_loop(p))), None)
    if isinstance(model, ModelProblem):
        reason, message = model.reason, model.message
    elif held and world.rejection is not None:
        reason, message = "PodCreateRejected", world.rejection.describe()
    elif problem is not None:
        reason = problem.condition_reason
        message = f"{problem.describe()}. Fix spec.image, the pull secret or the referenced ConfigMap/Secret."
    elif looping is not None:
        reason = "CrashLoopBackOff"
        message = f"{looping.describe()}. See the server's log (kubectl logs --previous)."
    elif world.verdict is not None:
        reason, message = world.verdict
        message = f"A group of {spec.nodes_per_replica} pods cannot be placed: {message}"
    elif (unschedulable := _unschedulable(pods)) is not None:
        reason, message = "Unschedulable", f"{unschedulable}. Free capacity or change the spec."
    elif stalled:
        reason, message = "RolloutStalled", "The new revision fails; see the Progressing condition."
    else:
        reason = "GroupsStarting"
        message = f"{len(ready)} of {desired} group(s) ready; waiting for {floor}."
    cond.set(READY, False, reason, message, warn=reason != "GroupsStarting")


def _scaling(
    cond: _Conditions, plan: ServicePlan, spec: InferenceServiceSpec, decision: Decision | None
) -> None:
    if spec.autoscaling is None:
        plan.status.pop("desiredReplicas", None)
        cond.set(
            SCALING_ACTIVE, False, "AutoscalingDisabled",
            "spec.autoscaling is not set; spec.replicas is driven by kubectl scale, HPA or KEDA.",
        )  # fmt: skip
        return
    if decision is None or decision.reason == "NoMetrics":
        cond.set(
            SCALING_ACTIVE, False, "NoMetrics",
            "No recent load samples from ready leaders; the replica count is kept.",
        )  # fmt: skip
        if decision is None:
            return
    else:
        cond.set(SCALING_ACTIVE, True, "MetricsAvailable", decision.message)
    plan.status["desiredReplicas"] = decision.desired
    if decision.desired != spec.replicas:
        plan.scale_to = decision.desired
