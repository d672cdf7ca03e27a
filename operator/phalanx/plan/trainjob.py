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
from phalanx.constants import (
    KUEUE_PREFERRED_TOPOLOGY_ANNOTATION,
    KUEUE_REQUIRED_TOPOLOGY_ANNOTATION,
    LABEL_PREEMPTIBLE,
    Reason,
)
from phalanx.observe import CreateRejection
from phalanx.placement import CLUSTER, Topology
from phalanx.render.pod import bound_to
from phalanx.render.trainjob import CONTAINER, JobRef, render_children, render_pod
from phalanx.status import (
    ADMITTED,
    FAILED,
    RESTARTING,
    RUNNING,
    STRAGGLING,
    SUCCEEDED,
    SUSPENDED,
    StatusDraft,
    progress_status,
    set_condition,
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
from .gang_progress import GangProgress, report_int
from .goodput import account_goodput
from .hang import find_hang, hang_failure
from .lifetime import deadline_left, stuck_terminating, ttl_left
from .queue_wait import Wait
from .straggler import avoid_nodes, describe_all, find_stragglers


@dataclass(frozen=True)
class World:
    """What the shell observed about one job: its pods, node health, admission and progress."""

    pods: Sequence[Mapping[str, Any]]
    ready_nodes: frozenset[str]
    verdict: tuple[str, str] | None = None  # (reason, message) from the admission loop
    progress: Mapping[str, Any] | None = None
    rejection: CreateRejection | None = None  # the API server's last refusal of a pod
    # The operator's topology: level names to node labels (Kueue's topology annotations).
    topology: Topology | None = None
    gang: GangProgress | None = None  # every rank's /progress, as last polled
    wait: Wait | None = None  # queue position and estimated start, while queued
    # The checkpoint claim is bound (or there is none): pods may be created already bound.
    # Not known means not bound: the gated path, which kube-scheduler's volume binding serves.
    claim_bound: bool = False
    # The admission loop looked at this generation before its pods existed and did not place
    # it: the gang waits as gated pods instead (`binds_at_creation`).
    declined: bool = False


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
    # Seconds the gang's step had stalled when this pass restarted it for a hang: lost work
    # the goodput timeline books at least (plan/goodput.py).
    hang_seconds: float | None = None
    # The gang waits for the admission loop's first look before any pod is created.
    wants_placement: bool = False

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
    if plan.create and spec.run_policy.gang_scheduler == "kueue":
        _kueue_topology(spec, world.topology, plan, now, metadata_generation)
    plan.status["goodput"] = dict(
        account_goodput(current_status, plan.status, world.gang, now, plan.hang_seconds)
    )
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
        st.data.pop("activeSince", None)  # the deadline's clock stops; a resume restarts it
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

    if preempted(st.data, generation):
        # The admission loop took this filler's spare nodes for a recovering gang and deleted
        # its pods: the gang is queued again, as after a suspension, not failed or restarted.
        _requeue_preempted(st, plan, pods, generation)
        _force_stuck(pods, world.ready_nodes, now, plan)
        return _finish(plan, st, pods)
    # Nodes of the previous gang lost after its restart are kept off too: a gang that lost
    # several nodes at once is replaced away from all of them, in one restart.
    _avoid(st, [observe.node_of(p) for p in old if _on_lost_node(p, world.ready_nodes)])

    # A rank that can no longer finish decides the fate of the whole gang.
    failures = [f for f in (rank_failure(p, world.ready_nodes) for p in current.values()) if f]
    # A node that failed its rank (rather than the workload failing) is kept off next time.
    _avoid(st, [f.node for f in failures if _node_failure(f)])
    rules = spec.failure_policy.rules
    ignored = {f.rank for f in failures if failure_action(f, rules) == "Ignore"}
    fatal = [f for f in failures if failure_action(f, rules) == "FailJob"]
    restart = [f for f in failures if f.rank not in ignored and f not in fatal]
    if fatal:
        _fail_permanently(st, plan, pods, fatal[0], rules)
        return _finish(plan, st, pods)
    missing = [r for r in range(spec.nodes) if r not in current]
    lost = lost_ranks(spec.nodes, generation, pods, st.is_true(ADMITTED))
    if lost:
        # A rank vanished from an admitted gang: its peers cannot finish without it.
        restart.append(
            RankFailure(lost[0], f"{ref.name}-{lost[0]}", "", None, (Reason.POD_MISSING,))
        )
    if restart:
        _restart(spec, st, plan, pods, restart[0], generation, what=_lost_together(restart))
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
        st.data.setdefault("startTime", timestamp(now))
        st.data.setdefault("queuedAt", timestamp(now))
        if _create_missing(ref, spec, st, plan, world, missing, generation):
            return _finish(plan, st, pods)

    _admission(spec, st, plan, list(current.values()), world, now, missing, set(finished))
    if st.is_true(ADMITTED) and "activeSince" not in st.data:
        # The job became active: activeDeadlineSeconds counts from here (plan/lifetime.py).
        st.data["activeSince"] = st.data.get("admittedAt") or timestamp(now)
        remaining = deadline_left(spec, st.data, now)
        if remaining is not None:
            plan.later(max(remaining, 0))
    gang = world.gang if world.gang is not None and world.gang.generation == generation else None
    if gang is not None and st.is_true(RUNNING) and _watch_gang(spec, st, plan, pods, gang, now):
        return _finish(plan, st, pods)
    if world.progress is not None and st.is_true(RUNNING):
        st.data["progress"] = progress_status(world.progress)
        _copy_exports(
            st.data,
            observe.export_path(world.progress.get("exportPath")),
            observe.export_steps(world.progress.get("exportSteps")),
        )
    return _finish(plan, st, pods)


def binds_at_creation(spec: LLMTrainJobSpec, claim_bound: bool) -> bool:
    """Whether this job's pods are created already bound to their placed nodes, once the
    admission loop has placed the gang (docs/placement.md, "Who binds").

    Only for the built-in gang scheduler without a scheduler of the user's own (that one is
    meant to bind), once the checkpoint claim is bound (binding an unbound WaitForFirstConsumer
    claim is kube-scheduler's work, which a pod created bound skips), and for templates with
    nothing only kube-scheduler checks: pod (anti-)affinity, topology spread, host ports
    (hostNetwork) and claims of the template's own."""
    policy = spec.run_policy
    if policy.gang_scheduler != "builtin" or policy.scheduler_name or not claim_bound:
        return False
    if spec.pod_template is None:
        return True
    template = spec.pod_template.spec
    affinity = template.affinity or {}
    return not (
        affinity.get("podAffinity")
        or affinity.get("podAntiAffinity")
        or template.topology_spread_constraints
        or template.host_network
        or any(v.persistent_volume_claim is not None for v in template.volumes)
    )


def gang_pod(
    ref: JobRef,
    spec: LLMTrainJobSpec,
    status: Mapping[str, Any],
    rank: int,
    generation: int,
) -> dict[str, Any]:
    """Rank `rank`'s pod of gang `generation` as it is created (gated, off avoided nodes); the
    admission loop places a gang whose pods do not exist yet from rank 0's."""
    avoided = status.get("avoidedNodes") or []
    return _mark_preemptible(spec, avoid_nodes(render_pod(ref, spec, rank, generation), avoided))


def recorded_nodes(status: Mapping[str, Any], generation: int, size: int) -> list[str] | None:
    """The nodes the admission loop recorded for gang `generation`, one per rank, if any."""
    placement = status.get("placement") or {}
    nodes = [str(n) for n in placement.get("nodes") or []]
    return nodes if placement.get("generation") == generation and len(nodes) == size else None


def _create_missing(
    ref: JobRef,
    spec: LLMTrainJobSpec,
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
    world: World,
    missing: list[int],
    generation: int,
) -> bool:
    """Plan the missing ranks' pods: bound to their recorded nodes once the gang is placed,
    nothing yet while the admission loop has not looked at a gang that could be created
    bound, gated otherwise. True when the pass ends here (placed on a node lost since)."""
    placed = recorded_nodes(st.data, generation, spec.nodes)
    direct = binds_at_creation(spec, world.claim_bound)
    if placed is not None and direct:
        lost = [placed[r] for r in missing if placed[r] not in world.ready_nodes]
        if lost:
            _replace(st, plan, lost)
            return True
        plan.create += [
            bound_to(gang_pod(ref, spec, st.data, rank, generation), placed[rank])
            for rank in missing
        ]
        return False
    if direct and not world.declined:
        plan.wants_placement = True
        return False
    plan.create += [gang_pod(ref, spec, st.data, rank, generation) for rank in missing]
    return False


def lost_ranks(
    nodes: int, generation: int, pods: Sequence[Mapping[str, Any]], admitted: bool
) -> list[int]:
    """Ranks missing from gang `generation` once it was admitted (every rank existed, placed)
    while no older gang is left: each is a `PodMissing` failure that restarts the whole gang,
    so the shell confirms the absence with the API server before planning on it. Before
    admission a missing rank is one still to be created."""
    current = [p for p in pods if observe.generation(p) == generation]
    if not admitted or len(current) < len(pods) or all(observe.gated(p) for p in current):
        return []
    present = {observe.rank(p) for p in current}
    return [rank for rank in range(nodes) if rank not in present]


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
    if complete and not gated and _scheduler_admitted(spec, pods):
        placement = st.data.get("placement") or {}
        where = (
            f" in {placement.get('level')} {placement.get('domain')}"
            if placement.get("domain")
            else ""
        )
        reason = Reason.GANG_ADMITTED if builtin else Reason.SCHEDULER_MANAGED
        st.set(ADMITTED, True, reason, f"{spec.nodes} pods placed{where}.")
        st.data["accelerators"] = spec.nodes * spec.accelerator.count()
        st.data.pop("queue", None)
    elif world.verdict is not None:
        reason, message = world.verdict
        st.set(ADMITTED, False, reason, message, warn=True)
        if world.wait is not None:
            st.data["queue"] = world.wait.wire()
    else:
        waiting = (
            f"Waiting for capacity for {spec.nodes} pods in one domain."
            if builtin
            else f"Waiting for {SCHEDULER_WORDS[spec.run_policy.gang_scheduler]} "
            f"all {spec.nodes} pods."
        )
        st.set(ADMITTED, False, Reason.QUEUED, waiting)

    running = [p for p in pods if observe.running(p) or observe.rank(p) in finished]
    if complete and len(running) == spec.nodes:
        st.set(RUNNING, True, Reason.ALL_RANKS_RUNNING, f"All {spec.nodes} ranks are running.")
        st.clear(RESTARTING, Reason.GANG_RUNNING, "The restarted gang is running.")
        st.data.pop("gangTimeouts", None)
        return
    timeout = spec.failure_policy.gang_timeout_seconds
    stuck = [p for p in pods if p not in running]
    if builtin and complete and not gated and _placed_on_lost(st, plan, stuck, world.ready_nodes):
        plan.delete += [p["metadata"]["name"] for p in pods if not observe.terminating(p)]
        return
    problems = [found for p in stuck if (found := observe.start_problem(p)) is not None]
    if complete and not gated and problems:
        st.set(
            RUNNING, False, problems[0].condition_reason,
            f"{problems[0].describe()}. {problems[0].remedy} Unless it clears, the gang "
            f"restarts {timeout}s after placement (counted against failurePolicy.maxRestarts).",
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
            timeouts = int(st.data.get("gangTimeouts") or 0) + 1
            if timeouts >= MAX_GANG_TIMEOUTS:
                _fail(
                    st, plan, pods, Reason.GANG_TIMEOUT_LIMIT_EXCEEDED,
                    f"Not all pods were running {timeout}s after placement, {timeouts} times in "
                    f"a row (last: {names}); kube-scheduler keeps refusing the nodes placed on. "
                    "Check the pods' constraints and the nodes, then recreate the job.",
                )  # fmt: skip
                return
            st.data["gangTimeouts"] = timeouts
            # kube-scheduler would not bind these pods to the nodes they were placed on: the
            # next gang keeps off them, rather than being placed there again.
            placed = (st.data.get("placement") or {}).get("nodes") or []
            _avoid(
                st,
                [
                    placed[observe.rank(p)]
                    for p in stuck
                    if not observe.node_of(p) and 0 <= observe.rank(p) < len(placed)
                ],
            )
            plan.delete += [p["metadata"]["name"] for p in pods if not observe.terminating(p)]
            st.set(
                ADMITTED,
                False,
                Reason.GANG_TIMEOUT,
                f"Not all pods were running {timeout}s after placement: {names}; the gang was "
                f"re-queued (gang timeout {timeouts} of {MAX_GANG_TIMEOUTS} in a row).",
                warn=True,
            )
            _next_generation(st, int(st.data["gangGeneration"]))
            return
        plan.later(timeout - waited)


def _watch_gang(
    spec: LLMTrainJobSpec,
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
    pods: list[Mapping[str, Any]],
    gang: GangProgress,
    now: datetime,
) -> bool:
    """Hangs and stragglers of a running gang (plan/hang.py, plan/straggler.py); True when the
    gang was restarted or the job failed."""
    policy = spec.failure_policy
    generation = int(st.data["gangGeneration"])
    hung, wait = find_hang(gang, policy.hang_timeout_seconds, now)
    if wait is not None:
        plan.later(wait)
    if hung is not None:
        failure = hang_failure(hung, gang, spec.nproc_per_node())
        action = failure_action(failure, policy.rules)
        if action == "FailJob":
            _fail_permanently(st, plan, pods, failure, policy.rules)
            return True
        if action == "RestartGang":
            what = f"Hang: {hung.describe(gang)}"
            _restart(spec, st, plan, pods, failure, generation, Reason.HANG, what)
            plan.hang_seconds = hung.stalled_seconds
            return True
    found, wait = find_stragglers(gang, policy.stragglers.window_seconds, now)
    if wait is not None:
        plan.later(wait)
    if not found:
        st.data.pop("stragglers", None)
        st.clear(STRAGGLING, Reason.NO_STRAGGLERS, "Every rank keeps pace with the gang.")
        return False
    checkpoint = report_int((gang.leader or {}).get("lastCheckpointStep"))
    known = {int(s.get("rank", -1)): s for s in st.data.get("stragglers") or []}
    # The checkpoint when each was first found: a Replace waits for a newer one.
    listed = [
        {**s.wire(), "checkpointStep": known.get(s.rank, {}).get("checkpointStep", checkpoint)}
        for s in found
    ]
    st.data["stragglers"] = listed
    replace = policy.stragglers.action == "Replace"
    then = (
        "its node is avoided and the gang restarts from the next checkpoint"
        if replace
        else "set failurePolicy.stragglers.action: Replace to move the gang off its node"
    )
    st.set(STRAGGLING, True, Reason.STRAGGLER_DETECTED, f"{describe_all(found)}; {then}.", True)
    if not replace:
        return False
    avoided = list(st.data.get("avoidedNodes") or [])
    avoided += [n for n in dict.fromkeys(s.node for s in found) if n and n not in avoided]
    st.data["avoidedNodes"] = avoided
    due = []
    for s, wire in zip(found, listed, strict=True):
        found_at = report_int(wire["checkpointStep"])
        if checkpoint is not None and checkpoint > (-1 if found_at is None else found_at):
            due.append(s)
    if not due:
        return False
    first = due[0]
    failure = RankFailure(
        first.rank // spec.nproc_per_node(),
        first.pod,
        first.node,
        None,
        (Reason.STRAGGLER_REPLACED,),
    )
    what = f"Straggler replaced at checkpoint {checkpoint}: {describe_all(due)}"
    _restart(spec, st, plan, pods, failure, generation, Reason.STRAGGLER_REPLACED, what)
    return True


# What a gang handed to another scheduler waits for before it counts as admitted.
SCHEDULER_WORDS = {
    "kueue": "Kueue to admit (lift its scheduling gate from)",
    "none": "kube-scheduler to bind",
    "volcano": "Volcano to bind",
    "coscheduling": "the coscheduling plugin to bind",
}


def _scheduler_admitted(spec: LLMTrainJobSpec, pods: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the scheduler in charge has taken the whole gang: for builtin the lifted gate
    says so; Kueue admits a pod group by lifting its own scheduling gate from every pod; any
    other scheduler has admitted a pod once it bound it. Until then the gang holds nothing."""
    scheduler = spec.run_policy.gang_scheduler
    if scheduler == "builtin":
        return True
    if scheduler == "kueue":
        return not any((p.get("spec") or {}).get("schedulingGates") for p in pods)
    return all(observe.node_of(p) for p in pods)


def _kueue_topology(
    spec: LLMTrainJobSpec,
    topology: Topology | None,
    plan: Plan,
    now: datetime,
    generation: int | None,
) -> None:
    """spec.topology as Kueue's topology-aware scheduling request on every pod created: the
    node label of the required level (or else the preferred one). A level the operator's
    topology does not define creates nothing and says so."""
    level = spec.topology.required or spec.topology.preferred
    if level is None or level == CLUSTER:
        return  # anywhere in the cluster: nothing to ask of Kueue
    annotation = (
        KUEUE_REQUIRED_TOPOLOGY_ANNOTATION
        if spec.topology.required
        else KUEUE_PREFERRED_TOPOLOGY_ANNOTATION
    )
    if topology is None or not topology.has_level(level):
        known = ", ".join(topology.names) if topology is not None else "none known"
        plan.create = []
        plan.status["conditions"], _ = set_condition(
            plan.status.get("conditions") or [], ADMITTED, False, Reason.UNKNOWN_TOPOLOGY_LEVEL,
            f"spec.topology names level {level!r}, but the operator's topology has only "
            f"{known}; Kueue needs its node label. Fix spec.topology.",
            now, generation,
        )  # fmt: skip
        return
    label = topology.label(level)
    for pod in plan.create:
        pod["metadata"].setdefault("annotations", {})[annotation] = label


# Consecutive gang timeouts after which the job fails: placement and kube-scheduler disagree
# for a reason no re-queue fixes (without a bound nothing would stop the loop).
MAX_GANG_TIMEOUTS = 3
# Why a rank ended that blames its node, not the workload (kubelet and node-lifecycle reasons).
NODE_FAILURE_REASONS = frozenset(
    {Reason.NODE_LOST, "Evicted", "NodeShutdown", "Terminated", "UnexpectedAdmissionError"}
)


def _node_failure(failure: RankFailure) -> bool:
    return bool(failure.node) and any(
        r in NODE_FAILURE_REASONS or r.startswith("OutOf") for r in failure.reasons
    )


def _avoid(st: StatusDraft[LLMTrainJobStatusFields], nodes: Sequence[str]) -> None:
    """Add nodes to status.avoidedNodes: the job's new pods carry a node affinity keeping them
    off these, which placement and kube-scheduler both honour."""
    avoided = list(st.data.get("avoidedNodes") or [])
    added = [node for node in dict.fromkeys(nodes) if node and node not in avoided]
    if added:
        st.data["avoidedNodes"] = avoided + added


def _pending_reason(pod: Mapping[str, Any]) -> str:
    return observe.unschedulable_message(pod) or observe.phase(pod)


def _next_generation(st: StatusDraft[LLMTrainJobStatusFields], generation: int) -> int:
    st.data["gangGeneration"] = generation + 1
    st.data.pop("placement", None)
    st.data.pop("admittedAt", None)
    st.data.pop("queuedAt", None)
    st.data["accelerators"] = 0
    # Stragglers are judged per gang: the next one starts with a clean slate.
    st.data.pop("stragglers", None)
    st.clear(STRAGGLING, Reason.GANG_RESTARTING, "A new gang is starting.")
    return generation + 1


def _restart(
    spec: LLMTrainJobSpec,
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
    pods: list[Mapping[str, Any]],
    failure: RankFailure,
    generation: int,
    reason: str = Reason.RANK_FAILED,
    what: str | None = None,
) -> None:
    what = what or failure.describe()
    restarts = int(st.data.get("restarts") or 0)
    limit = spec.failure_policy.max_restarts
    if restarts >= limit:
        _fail(
            st,
            plan,
            pods,
            Reason.RESTART_LIMIT_EXCEEDED,
            f"{what}; the gang already restarted {restarts} times (maxRestarts {limit}).",
        )
        return
    st.data["restarts"] = restarts + 1
    plan.delete += [p["metadata"]["name"] for p in pods if not observe.terminating(p)]
    placement = st.data.get("placement")
    if placement and placement.get("domain"):
        # Where the replacement looks first under a spare policy (handlers.admission).
        st.data["recoverFrom"] = placement
    st.set(
        RESTARTING,
        True,
        reason,
        f"{what}; restarting the whole gang from the newest checkpoint (restart {restarts + 1} of {limit}).",
        warn=True,
    )
    st.clear(RUNNING, reason, what)
    st.clear(ADMITTED, Reason.GANG_RESTARTING, "The gang is being recreated.")
    _next_generation(st, generation)


def _placed_on_lost(
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
    stuck: Sequence[Mapping[str, Any]],
    ready_nodes: frozenset[str],
) -> bool:
    """A placed gang whose unbound pods are pinned to a node lost since placement (several
    nodes failing one after another, the gang placed in between) can never start there: it is
    placed again at once, off those nodes, without waiting for the gang timeout and without
    counting a restart (no rank ever ran). True when that happened."""
    placed = (st.data.get("placement") or {}).get("nodes") or []
    lost = [
        placed[observe.rank(p)]
        for p in stuck
        if not observe.node_of(p)
        and 0 <= observe.rank(p) < len(placed)
        and placed[observe.rank(p)] not in ready_nodes
    ]
    if not lost:
        return False
    _replace(st, plan, lost)
    return True


def _replace(st: StatusDraft[LLMTrainJobStatusFields], plan: Plan, lost: Sequence[str]) -> None:
    """Place the gang again, off `lost`, without counting a restart."""
    _avoid(st, lost)
    names = ", ".join(dict.fromkeys(lost))
    st.set(
        ADMITTED, False, Reason.NODE_LOST,
        f"Placed on {names}, lost before the pods were bound; the gang is placed again "
        "(no restart counted).",
        warn=True,
    )  # fmt: skip
    _next_generation(st, int(st.data["gangGeneration"]))
    plan.later(1)


def preempted(status: Mapping[str, Any], generation: int) -> bool:
    """Whether the admission loop preempted this generation of the gang from spare nodes."""
    record = status.get("preemption") or {}
    return record.get("generation") == generation


def _requeue_preempted(
    st: StatusDraft[LLMTrainJobStatusFields],
    plan: Plan,
    pods: list[Mapping[str, Any]],
    generation: int,
) -> None:
    record = st.data.get("preemption") or {}
    nodes = ", ".join(record.get("nodes") or []) or "its spare nodes"
    message = (
        f"Preempted from spare nodes ({nodes}) for the recovery of {record.get('by')}; "
        "the gang is queued again (no restart counted)."
    )
    plan.delete += [p["metadata"]["name"] for p in pods if not observe.terminating(p)]
    st.set(ADMITTED, False, Reason.PREEMPTED, message, warn=True)
    st.clear(RUNNING, Reason.PREEMPTED, message)
    st.data.pop("recoverFrom", None)
    _next_generation(st, generation)


def _on_lost_node(pod: Mapping[str, Any], ready_nodes: frozenset[str]) -> bool:
    node = observe.node_of(pod)
    return bool(node) and node not in ready_nodes and observe.phase(pod) != "Succeeded"


def _lost_together(failures: Sequence[RankFailure]) -> str | None:
    """The restart's account when ranks on several lost nodes fail in one pass: one restart
    replaces all of them."""
    lost = list(dict.fromkeys(f.node for f in failures if f.node and Reason.NODE_LOST in f.reasons))
    if len(lost) < 2:
        return None
    ranks = sorted(f.rank for f in failures if f.node in lost)
    return (
        f"{len(lost)} nodes lost together ({', '.join(lost)}; ranks "
        f"{', '.join(map(str, ranks))}); {failures[0].describe()}"
    )


def _mark_preemptible(spec: LLMTrainJobSpec, pod: dict[str, Any]) -> dict[str, Any]:
    """Pods of a preemptible job carry the label the admission loop tells fillers by."""
    if spec.run_policy.preemptible:
        pod["metadata"].setdefault("labels", {})[LABEL_PREEMPTIBLE] = "true"
    return pod


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
