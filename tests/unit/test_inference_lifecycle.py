"""InferenceService planning: model resolution, group failures, rollout steps, status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from builders import SERVICE, TINY, group_pods, make_service, trainjob_object

from phalanx.api.inference import InferenceServiceSpec
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError, parse
from phalanx.observe import CreateRejection
from phalanx.plan.autoscale import Decision
from phalanx.plan.groups import group_failure, groups_of
from phalanx.plan.inference import ServiceWorld, plan_service
from phalanx.plan.model_source import ModelProblem, resolve_model
from phalanx.plan.rollout import GroupView, plan_rollout, rollout_bounds
from phalanx.render.inference import ModelMount, template_revision

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
REF = SERVICE
NODES = frozenset({"n1", "n2", "n3", "n4"})


def stamp(seconds_ago: float = 0) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def group(
    spec: InferenceServiceSpec, index: int, revision: str, **fields: Any
) -> list[dict[str, Any]]:
    return group_pods(spec, index, revision, NOW, **fields)


# --- model resolution --------------------------------------------------------------------


def resolve(
    spec: InferenceServiceSpec, job: dict[str, Any] | None, claims: frozenset[str] | None
) -> ModelMount | ModelProblem:
    """resolve_model as the shell calls it: the job parsed (or why not) and its status."""
    parsed: LLMTrainJob | SpecError | None = None
    if job is not None:
        try:
            parsed = parse(job, LLMTrainJob)
        except SpecError as error:
            parsed = error
    return resolve_model(spec, parsed, (job or {}).get("status") or {}, claims)


@pytest.mark.parametrize(
    ("model", "job", "claims", "expected"),
    [
        pytest.param({"builtin": "tiny"}, None, None, TINY, id="builtin"),
        pytest.param(
            {"claim": {"name": "weights", "path": "llama/"}},
            None,
            frozenset({"weights"}),
            ModelMount("/models/llama", "claim:weights/llama", "weights"),
            id="claim-and-path",
        ),
        pytest.param(
            {"claim": {"name": "weights"}},
            None,
            frozenset(),
            ModelProblem("ClaimNotFound", ""),
            id="claim-missing",
        ),
        pytest.param(
            {"fromTrainJob": {"name": "gpt"}},
            None,
            None,
            ModelProblem("TrainJobNotFound", ""),
            id="job-missing",
        ),
        pytest.param(
            {"fromTrainJob": {"name": "gpt"}},
            trainjob_object("Running"),
            None,
            ModelProblem("ExportNotReady", ""),
            id="job-running-no-export",
        ),
        pytest.param(
            {"fromTrainJob": {"name": "gpt"}},
            trainjob_object("Succeeded", "export"),
            frozenset({"gpt-checkpoint"}),
            ModelMount("/models/export", "gpt/export@12345678", "gpt-checkpoint"),
            id="job-exported",
        ),
        pytest.param(
            {"fromTrainJob": {"name": "gpt"}},
            trainjob_object("Succeeded", "export", checkpoint={"existingClaim": "shared"}),
            None,
            ModelMount("/models/export", "gpt/export@12345678", "shared"),
            id="job-with-existing-claim",
        ),
        pytest.param(
            {"fromTrainJob": {"name": "gpt"}},
            trainjob_object("Succeeded", "export", checkpoint={"enabled": False}),
            None,
            ModelProblem("TrainJobHasNoCheckpoint", ""),
            id="job-without-checkpoint",
        ),
        pytest.param(
            {"fromTrainJob": {"name": "gpt"}},
            trainjob_object("Succeeded", "export"),
            frozenset(),
            ModelProblem("ClaimNotFound", ""),
            id="job-claim-deleted",
        ),
        pytest.param(
            {"fromTrainJob": {"name": "gpt", "step": 200}},
            trainjob_object("Running", steps=[100, 200]),
            None,
            ModelMount(
                "/models/exports/step-200", "gpt/exports/step-200@12345678", "gpt-checkpoint"
            ),
            id="job-step-reported",
        ),
        pytest.param(
            {"fromTrainJob": {"name": "gpt", "step": 200}},
            trainjob_object("Succeeded", "export", steps=[100, 300]),
            None,
            ModelProblem("ExportNotReady", ""),
            id="job-step-not-reported-even-after-success",
        ),
        pytest.param(
            {"fromTrainJob": {"name": "gpt"}},
            trainjob_object("Succeeded"),
            None,
            ModelProblem("ExportNotReady", ""),
            id="job-succeeded-without-reported-export",
        ),
    ],
)
def test_resolve_model(
    model: dict[str, Any],
    job: dict[str, Any] | None,
    claims: frozenset[str] | None,
    expected: ModelMount | ModelProblem,
) -> None:
    resolved = resolve(make_service(model=model), job, claims)
    if isinstance(expected, ModelProblem):
        assert isinstance(resolved, ModelProblem)
        assert resolved.reason == expected.reason
        assert resolved.message
    else:
        assert resolved == expected


# --- rollout planning --------------------------------------------------------------------


def views(*groups: tuple[int, str, bool]) -> list[GroupView]:
    return [GroupView(i, r, ready) for i, r, ready in groups]


@pytest.mark.parametrize(
    ("desired", "groups", "surge", "unavailable", "stalled", "create", "delete"),
    [
        pytest.param(3, views(), 1, 0, False, (0, 1, 2), (), id="fresh-creates-all"),
        pytest.param(
            2,
            views((0, "new", True), (1, "new", True), (2, "new", False)),
            1,
            0,
            False,
            (),
            (2,),
            id="scale-down-drops-unready-first",
        ),
        pytest.param(
            3,
            views((0, "new", True)),
            1,
            0,
            False,
            (1, 2),
            (),
            id="scale-up-lowest-free",
        ),
        pytest.param(
            3,
            views((0, "old", True), (1, "old", True), (2, "old", True)),
            1,
            0,
            False,
            (3,),
            (),
            id="surge-first",
        ),
        pytest.param(
            3,
            views((0, "old", True), (1, "old", True), (2, "old", True), (3, "new", False)),
            1,
            0,
            False,
            (),
            (),
            id="wait-for-the-surge-group",
        ),
        pytest.param(
            3,
            views((0, "old", True), (1, "old", True), (2, "old", True), (3, "new", True)),
            1,
            0,
            False,
            (4,),
            (2,),
            id="replace-one-old-when-new-ready",
        ),
        pytest.param(
            3,
            views((0, "old", True), (1, "old", True), (2, "old", True)),
            0,
            1,
            False,
            (3,),
            (2,),
            id="unavailable-replaces-in-place",
        ),
        pytest.param(
            3,
            views((0, "old", True), (1, "old", True)),
            0,
            1,
            False,
            (2,),
            (),
            id="then-creates-in-the-room",
        ),
        pytest.param(
            3,
            views((0, "old", False), (1, "old", True), (2, "old", True)),
            1,
            0,
            False,
            (3, 4),
            (0,),
            id="unready-old-costs-nothing",
        ),
        pytest.param(
            3,
            views((0, "old", True), (1, "old", True), (2, "old", True), (3, "new", True)),
            1,
            0,
            True,
            (),
            (),
            id="stalled-keeps-old-and-creates-nothing",
        ),
    ],
)
def test_plan_rollout(
    desired: int,
    groups: list[GroupView],
    surge: int,
    unavailable: int,
    stalled: bool,
    create: tuple[int, ...],
    delete: tuple[int, ...],
) -> None:
    step = plan_rollout(desired, "new", groups, surge, unavailable, stalled=stalled)
    assert (step.create, step.delete) == (create, delete)


@pytest.mark.parametrize("surge", [0, 1, 2])
@pytest.mark.parametrize("unavailable", [0, 1, 2])
def test_rollout_never_drops_below_the_floor_and_finishes(surge: int, unavailable: int) -> None:
    """Simulate whole rollouts: groups become ready one pass after they are created."""
    if surge == 0 and unavailable == 0:
        unavailable = 1
    desired = 4
    groups = {i: GroupView(i, "old", True) for i in range(desired)}
    for _ in range(50):
        step = plan_rollout(desired, "new", list(groups.values()), surge, unavailable)
        for index in step.delete:
            del groups[index]
        ready = sum(g.ready for g in groups.values())
        assert ready >= desired - unavailable
        assert len(groups) + len(step.create) <= desired + surge
        # Created groups become ready by the next pass.
        groups = {i: GroupView(i, g.revision, True) for i, g in groups.items()}
        for index in step.create:
            groups[index] = GroupView(index, "new", False)
        if len(groups) == desired and all(g.revision == "new" and g.ready for g in groups.values()):
            break
        groups = {i: GroupView(i, g.revision, True) for i, g in groups.items()}
    assert sorted(g.revision for g in groups.values()) == ["new"] * desired


@pytest.mark.parametrize(
    ("surge", "unavailable", "replicas", "expected"),
    [(1, 0, 4, (1, 0)), ("25%", "25%", 4, (1, 1)), ("10%", "10%", 4, (1, 0)), (0, 0, 3, (0, 1))],
)
def test_rollout_bounds(surge: Any, unavailable: Any, replicas: int, expected: Any) -> None:
    spec = make_service(rollout={"maxSurge": surge, "maxUnavailable": unavailable})
    assert rollout_bounds(spec, replicas) == expected


# --- group failure -----------------------------------------------------------------------


def test_one_failed_pod_fails_the_whole_group() -> None:
    spec = make_service(nodesPerReplica=2)
    pods = group(spec, 0, "r")
    pods[1]["status"]["phase"] = "Failed"
    [g] = groups_of(pods).values()
    assert "chat-0-1" in (group_failure(g, 2, NODES) or "")


def test_a_restarted_container_fails_a_multi_pod_group_but_not_a_single_pod() -> None:
    restarted = {"containerStatuses": [{"name": "server", "restartCount": 1}]}
    for size, fails in ((1, False), (2, True)):
        spec = make_service(nodesPerReplica=size)
        [g] = groups_of(group(spec, 0, "r", **restarted)).values()
        assert (group_failure(g, size, NODES) is not None) is fails


def test_lost_node_fails_the_group() -> None:
    spec = make_service(nodesPerReplica=2)
    [g] = groups_of(group(spec, 0, "r")).values()
    assert "lost its node" in (group_failure(g, 2, frozenset({"n1"})) or "")


# --- the whole reconcile -----------------------------------------------------------------


def plan(spec: InferenceServiceSpec, pods: list[dict[str, Any]], **world: Any) -> Any:
    world.setdefault("model", TINY)
    return plan_service(
        REF, spec, 2, world.pop("status", {}), ServiceWorld(pods, NODES, **world), NOW
    )


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_fresh_service_creates_groups_and_reports_status() -> None:
    spec = make_service(replicas=2)
    p = plan(spec, [])
    assert [pod["metadata"]["name"] for pod in p.create] == ["chat-0-0", "chat-1-0"]
    assert p.status["selector"] == "phalanx.dev/inference-service=chat,phalanx.dev/worker-index=0"
    assert p.status["url"] == "http://chat.ml.svc/v1"
    assert p.status["modelRevision"] == "builtin:tiny"
    assert p.status["revision"] == template_revision(spec, TINY)
    assert conditions(p.status) == {
        "ModelLoaded": ("False", "Loading"),
        "Progressing": ("True", "Scaling"),
        "Ready": ("False", "GroupsStarting"),
        "ScalingActive": ("False", "AutoscalingDisabled"),
    }


def test_all_groups_ready_is_ready_and_complete() -> None:
    spec = make_service(replicas=2)
    rev = template_revision(spec, TINY)
    p = plan(spec, [*group(spec, 0, rev), *group(spec, 1, rev)])
    assert not p.create
    assert not p.delete
    assert (p.status["replicas"], p.status["readyReplicas"]) == (2, 2)
    assert conditions(p.status)["Ready"] == ("True", "MinimumReplicasAvailable")
    assert conditions(p.status)["ModelLoaded"] == ("True", "Loaded")
    assert conditions(p.status)["Progressing"] == ("False", "RolloutComplete")
    assert ("Normal", "Loaded") in [(k, r) for k, r, _ in p.events]


def test_model_problem_creates_nothing_and_says_what_to_fix() -> None:
    problem = ModelProblem("TrainJobNotFound", "LLMTrainJob gpt does not exist; create it.")
    p = plan(make_service(replicas=2), [], model=problem)
    assert not p.create
    assert conditions(p.status)["Ready"] == ("False", "TrainJobNotFound")
    assert conditions(p.status)["ModelLoaded"] == ("False", "TrainJobNotFound")


def test_failed_pod_recreates_its_whole_group() -> None:
    spec = make_service(replicas=1, nodesPerReplica=2)
    rev = template_revision(spec, TINY)
    pods = group(spec, 0, rev)
    pods[0]["status"]["phase"] = "Failed"
    p = plan(spec, pods)
    assert p.delete == ["chat-0-0", "chat-0-1"]
    assert [pod["metadata"]["name"] for pod in p.create] == ["chat-1-0", "chat-1-1"]
    assert any(reason == "GroupRecreated" for _, reason, _ in p.events)


def test_failed_new_revision_stalls_and_keeps_old_groups() -> None:
    spec = make_service(replicas=2)
    rev = template_revision(spec, TINY)
    pods = [*group(spec, 0, "old"), *group(spec, 1, "old"), *group(spec, 2, rev)]
    pods[-1]["status"]["phase"] = "Failed"
    p = plan(spec, pods)
    assert p.delete == ["chat-2-0"]
    assert not p.create
    assert p.status["stalledRevision"] == rev
    assert conditions(p.status)["Progressing"] == ("False", "RolloutStalled")
    assert conditions(p.status)["Ready"] == ("True", "MinimumReplicasAvailable")
    # The next pass keeps it that way.
    again = plan(spec, pods[:2], status=p.status)
    assert not again.create
    assert not again.delete
    assert conditions(again.status)["Progressing"] == ("False", "RolloutStalled")


def test_new_group_past_the_deadline_stalls() -> None:
    spec = make_service(replicas=1, rollout={"progressDeadlineSeconds": 60})
    rev = template_revision(spec, TINY)
    pods = [*group(spec, 0, "old"), *group(spec, 1, rev, ready=False, age=120)]
    p = plan(spec, pods)
    assert conditions(p.status)["Progressing"] == ("False", "RolloutStalled")
    young = plan(spec, [*group(spec, 0, "old"), *group(spec, 1, rev, ready=False, age=10)])
    assert conditions(young.status)["Progressing"] == ("True", "RollingUpdate")
    assert young.requeue_after == pytest.approx(50)


def test_unplaceable_group_is_reported_on_ready() -> None:
    spec = make_service(replicas=1, nodesPerReplica=2)
    p = plan(spec, [], verdict=("GangExceedsDomainCapacity", "needs 2 nodes in one rack"))
    assert conditions(p.status)["Ready"] == ("False", "GangExceedsDomainCapacity")


def test_autoscaler_decision_scales_and_is_reported() -> None:
    spec = make_service(replicas=1, autoscaling={"maxReplicas": 4})
    decision = Decision(3, "ScaleUp", "requestsInFlight 24 for target 8: 1 -> 3 replicas.")
    p = plan(spec, [], decision=decision)
    assert p.scale_to == 3
    assert p.status["desiredReplicas"] == 3
    assert conditions(p.status)["ScalingActive"] == ("True", "MetricsAvailable")
    quiet = plan(spec, [], decision=Decision(1, "NoMetrics", "no samples"))
    assert quiet.scale_to is None
    assert conditions(quiet.status)["ScalingActive"] == ("False", "NoMetrics")


def test_missing_step_names_the_steps_that_exist() -> None:
    resolved = resolve(
        make_service(model={"fromTrainJob": {"name": "gpt", "step": 250}}),
        trainjob_object("Running", steps=[100, 200]),
        None,
    )
    assert resolved == ModelProblem(
        "ExportNotReady",
        "LLMTrainJob gpt has not reported an export of step 250 (export steps: 100, 200); "
        "waiting. Steps are exported every spec.trainer.exportEvery steps.",
    )


def test_crash_looping_server_is_reported_with_its_last_exit() -> None:
    spec = make_service(replicas=1)
    rev = template_revision(spec, TINY)
    pods = group(
        spec,
        0,
        rev,
        ready=False,
        containerStatuses=[
            {
                "name": "server",
                "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                "lastState": {
                    "terminated": {"exitCode": 1, "message": "no config.json in /models"}
                },
            }
        ],
    )
    p = plan(spec, pods)
    ready = next(c for c in p.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "CrashLoopBackOff")
    assert ready["message"] == (
        "container server of pod chat-0-0 is in CrashLoopBackOff (restarted 4 times; last exit "
        "code 1: 'no config.json in /models'). See the server's log (kubectl logs --previous)."
    )


def test_image_pull_failure_is_reported_on_ready() -> None:
    spec = make_service(replicas=1, image="ghcr.io/x/inference:typo")
    rev = template_revision(spec, TINY)
    pods = group(
        spec,
        0,
        rev,
        ready=False,
        containerStatuses=[
            {
                "name": "server",
                "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}},
            }
        ],
    )
    pods[0]["status"]["phase"] = "Pending"
    ready = next(c for c in plan(spec, pods).status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ImagePullFailed")
    assert "'ghcr.io/x/inference:typo'" in ready["message"]
    assert "pod chat-0-0" in ready["message"]


def test_rejected_pods_back_off_and_are_reported() -> None:
    spec = make_service(replicas=1)
    refused = CreateRejection("Pod chat-0-0", 422, "spec.dnsPolicy: Unsupported value", 1, NOW, 2)
    p = plan(spec, [], rejection=refused)
    assert not p.create
    assert p.requeue_after == 10
    assert conditions(p.status)["Ready"] == ("False", "PodCreateRejected")
    assert conditions(p.status)["Progressing"] == ("False", "PodCreateRejected")
    later = plan_service(
        REF,
        spec,
        2,
        {},
        ServiceWorld([], NODES, TINY, rejection=refused),
        NOW + timedelta(seconds=10),
    )
    assert [pod["metadata"]["name"] for pod in later.create] == ["chat-0-0"]
