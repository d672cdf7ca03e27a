"""Hang and straggler detection from every rank's /progress (plan/gang_progress.py,
plan/hang.py, plan/straggler.py) and what the planner does about them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from builders import make_job, pod

from phalanx.plan.gang_progress import GangProgress, RankAnswer, observe_gang, vanished
from phalanx.plan.hang import HANG_FLOOR_SECONDS, find_hang, hang_timeout
from phalanx.plan.poll_budget import PollTarget, cycle_rounds, plan_round
from phalanx.plan.straggler import avoid_nodes, find_stragglers, slow_ranks
from phalanx.plan.trainjob import Plan, World, plan_trainjob
from phalanx.render.trainjob import JobRef
from phalanx.status import find

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
REF = JobRef("j", "ml", "uid-1")
NODES = frozenset({"n1", "n2", "n3", "n4"})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def answers(
    steps: dict[int, int | None], seconds: dict[int, float] | None = None, **report: Any
) -> list[RankAnswer]:
    """One poll: rank -> step (None: the rank did not answer), on pod j-<rank>, node n<rank+1>."""
    return [
        RankAnswer(
            rank,
            f"j-{rank}",
            f"n{rank + 1}",
            None
            if step is None
            else {"step": step, "stepSeconds": (seconds or {}).get(rank, 1.0), **report},
        )
        for rank, step in steps.items()
    ]


def poll(
    script: list[tuple[float, list[RankAnswer]]], factor: float = 1.5, generation: int = 1
) -> GangProgress:
    gang: GangProgress | None = None
    for seconds, polled in script:
        gang = observe_gang(gang, generation, polled, at(seconds), factor)
    assert gang is not None
    return gang


EVERY = {0: 0, 1: 0, 2: 0, 3: 0}


def steady(
    until: float, every: float = 10.0, per_poll: int = 10
) -> list[tuple[float, list[RankAnswer]]]:
    """Four ranks moving `per_poll` steps every `every` seconds from 0 to `until`."""
    return [
        (t * every, answers({r: t * per_poll for r in EVERY}))
        for t in range(int(until // every) + 1)
    ]


def test_gang_progress_times_moves_and_knows_it_trains() -> None:
    gang = poll(steady(40))
    assert gang.step == 40
    assert gang.advanced
    assert gang.intervals == (10.0, 10.0, 10.0, 10.0)
    assert gang.stepped_at == at(40)
    assert gang.leader == {"step": 40, "stepSeconds": 1.0}


def test_a_new_generation_starts_a_new_picture() -> None:
    gang = poll(steady(40))
    fresh = observe_gang(gang, 2, answers({0: 40, 1: 40}), at(50), 1.5)
    assert (fresh.generation, fresh.advanced, fresh.intervals, fresh.step) == (2, False, (), 40)


@pytest.mark.parametrize(
    ("explicit", "intervals", "expected"),
    [
        pytest.param(60, (), 60.0, id="explicit"),
        pytest.param(None, (10.0, 10.0), None, id="too-few-moves-timed"),
        pytest.param(None, (10.0, 10.0, 10.0), HANG_FLOOR_SECONDS, id="floor"),
        pytest.param(None, (40.0, 50.0, 60.0, 900.0), 550.0, id="ten-times-median"),
    ],
)
def test_hang_timeout(
    explicit: int | None, intervals: tuple[float, ...], expected: float | None
) -> None:
    assert hang_timeout(explicit, GangProgress(1, intervals=intervals)) == expected


def test_a_stalled_gang_is_a_hang_naming_the_silent_rank() -> None:
    script = steady(40)
    # Rank 2 stops answering; the others stay at step 40 (blocked in a collective).
    script += [(t, answers({0: 40, 1: 40, 2: None, 3: 40})) for t in (50, 60, 70, 80, 90)]
    gang = poll(script)
    hung, wait = find_hang(gang, 45, at(84))
    assert hung is None
    assert wait == pytest.approx(1.0)
    hung, wait = find_hang(gang, 45, at(90))
    assert hung is not None
    assert wait is None
    assert (hung.step, hung.silent, hung.everyone, hung.stalled_seconds) == (40, (2,), False, 50.0)
    assert hung.describe(gang) == (
        "the step stayed at 40 for 50s (failurePolicy.hangTimeoutSeconds 45s); "
        "silent ranks 2 (pod j-2 on node n3)"
    )


def test_a_rank_behind_the_others_is_silent() -> None:
    script = steady(30) + [(t, answers({0: 40, 1: 30, 2: 40, 3: 40})) for t in (40, 50, 60, 70)]
    hung, _ = find_hang(poll(script), 20, at(70))
    assert hung is not None
    assert hung.silent == (1,)


def test_every_rank_answering_at_the_same_step_names_them_all() -> None:
    script = steady(30) + [(t, answers({r: 30 for r in EVERY})) for t in (40, 50, 60)]
    hung, _ = find_hang(poll(script), 25, at(60))
    assert hung is not None
    assert hung.everyone
    assert hung.silent == (0, 1, 2, 3)
    assert "every rank answers but none moved" in hung.describe(poll(script))


def test_no_hang_before_the_gang_trained_or_without_a_timeout() -> None:
    never_moved = poll([(t, answers(dict.fromkeys(EVERY, 0))) for t in (0, 10, 20)])
    assert find_hang(never_moved, 10, at(500)) == (None, None)
    two_moves = poll(steady(20))  # derived timeout needs three timed moves
    assert find_hang(two_moves, None, at(10_000)) == (None, None)


def test_slow_ranks_are_relative_to_the_gang_median() -> None:
    assert slow_ranks({0: 1.0, 1: 1.1, 2: 0.9, 3: 2.0}, 1.5) == {3}
    assert slow_ranks({0: 3.0, 1: 3.1, 2: 2.9, 3: 3.0}, 1.5) == set()  # slow as a whole
    assert slow_ranks({0: 1.0, 1: 2.0}, 1.5) == set()  # two ranks have no meaningful median
    assert slow_ranks({0: 1.0, 1: None, 2: 1.0, 3: 5.0}, 1.5) == {3}


def test_a_straggler_is_named_after_the_window_and_cleared_when_it_recovers() -> None:
    slow = {0: 1.0, 1: 1.0, 2: 2.0, 3: 1.0}
    script = [(t, answers(dict.fromkeys(EVERY, t), slow)) for t in (0, 10, 20, 30)]
    gang = poll(script)
    assert gang.ranks[2].slow_since == at(0)
    found, wait = find_stragglers(gang, 60, at(30))
    assert found == []
    assert wait == 30.0
    found, wait = find_stragglers(gang, 60, at(60))
    assert [(s.rank, s.node, s.step_seconds, s.median_seconds) for s in found] == [
        (2, "n3", 2.0, 1.0)
    ]
    assert found[0].describe() == (
        "rank 2 (pod j-2 on node n3) takes 2s per step, 2.0x the gang's median 1s, for 60s"
    )
    recovered = observe_gang(gang, 1, answers(dict.fromkeys(EVERY, 40)), at(40), 1.5)
    assert recovered.ranks[2].slow_since is None
    assert find_stragglers(recovered, 60, at(100)) == ([], None)


def test_a_synchronous_gang_is_judged_by_each_rank_s_own_pace() -> None:
    """Every rank of a synchronous gang waits for the slowest: equal wall times per step, and
    only `ownStepSeconds` names the slow rank."""
    own = {0: 0.5, 1: 0.5, 2: 1.0, 3: 0.5}

    def synchronous(t: float) -> list[RankAnswer]:
        return [
            RankAnswer(
                r, f"j-{r}", f"n{r + 1}", {"step": t, "stepSeconds": 1.0, "ownStepSeconds": s}
            )
            for r, s in own.items()
        ]

    gang = poll([(t, synchronous(t)) for t in (0, 10, 20, 30)])
    found, _ = find_stragglers(gang, 30, at(30))
    assert [(s.rank, s.step_seconds, s.median_seconds) for s in found] == [(2, 1.0, 0.5)]
    # A trainer that reports wall times only: nobody stands out.
    walls = poll(script=[(t, answers(dict.fromkeys(EVERY, t))) for t in (0, 10, 20, 30)])
    assert find_stragglers(walls, 30, at(30)) == ([], None)


def test_avoid_nodes_ands_the_rule_into_every_existing_term() -> None:
    mine = {"key": "pool", "operator": "In", "values": ["a"]}
    pod_spec: dict[str, Any] = {
        "spec": {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [mine]}, {}]
                    }
                }
            }
        }
    }
    avoided = avoid_nodes(pod_spec, ["n3", "n1"])
    rule = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1", "n3"]}
    terms = avoided["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [mine, rule]}, {"matchExpressions": [rule]}]
    assert (
        pod_spec["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"][1]
        == {}
    ), "the rendered pod is not changed in place"
    assert avoid_nodes({"spec": {}}, []) == {"spec": {}}


# --- the planner ---------------------------------------------------------------------------


def running(n: int = 4, gen: int = 1) -> list[dict[str, Any]]:
    return [pod("j", r, gen, "Running", node=f"n{r + 1}") for r in range(n)]


RUNNING_STATUS: dict[str, Any] = {
    "gangGeneration": 1,
    "restarts": 0,
    "admittedAt": "2026-01-01T11:59:00Z",
    "conditions": [
        {"type": "Admitted", "status": "True", "reason": "GangAdmitted", "message": "",
         "lastTransitionTime": "2026-01-01T11:59:00Z"},
        {"type": "Running", "status": "True", "reason": "AllRanksRunning", "message": "",
         "lastTransitionTime": "2026-01-01T11:59:00Z"},
    ],
}  # fmt: skip


def plan(
    gang: GangProgress, now: datetime, status: dict[str, Any] | None = None, **spec: Any
) -> Plan:
    job = make_job("j", nodes=4, **spec).build()
    world = World(running(), NODES, gang=gang)
    return plan_trainjob(REF, job, 1, status or RUNNING_STATUS, world, now)


def cond(p: Plan, kind: str) -> dict[str, Any]:
    found = find(p.status["conditions"], kind)
    assert found is not None, kind
    return found


def test_a_hung_gang_restarts_with_reason_hang_naming_step_and_silent_ranks() -> None:
    script = steady(40) + [
        (t, answers({0: 40, 1: 40, 2: None, 3: 40})) for t in (50, 60, 70, 80, 90)
    ]
    gang = poll(script)
    waiting = plan(gang, at(70), failurePolicy={"hangTimeoutSeconds": 45})
    assert waiting.delete == []
    assert waiting.requeue_after == pytest.approx(15.0)
    p = plan(gang, at(90), failurePolicy={"hangTimeoutSeconds": 45})
    restarting = cond(p, "Restarting")
    assert (restarting["status"], restarting["reason"]) == ("True", "Hang")
    assert restarting["message"].startswith(
        "Hang: the step stayed at 40 for 50s (failurePolicy.hangTimeoutSeconds 45s); "
        "silent ranks 2 (pod j-2 on node n3); restarting the whole gang"
    )
    assert p.status["restarts"] == 1
    assert p.status["gangGeneration"] == 2
    assert p.delete == ["j-0", "j-1", "j-2", "j-3"]
    assert ("Warning", "Hang") in [(kind, reason) for kind, reason, _ in p.events]
    assert p.status["goodput"]["failedAt"] == "2026-01-01T12:01:30.000000Z"


def test_a_failure_rule_on_hang_can_fail_the_job() -> None:
    script = steady(40) + [(t, answers(dict.fromkeys(EVERY, 40))) for t in (50, 60)]
    p = plan(
        poll(script),
        at(100),
        failurePolicy={
            "hangTimeoutSeconds": 30,
            "rules": [{"action": "FailJob", "onReasons": ["Hang"]}],
        },
    )
    failed = cond(p, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "PermanentFailure")
    assert "matches Hang" in failed["message"]


def straggling(until: float, slow: float = 2.0, checkpoint: int | None = 100) -> GangProgress:
    seconds = {0: 1.0, 1: 1.0, 2: slow, 3: 1.0}
    return poll(
        [
            (t, answers(dict.fromkeys(EVERY, int(t)), seconds, lastCheckpointStep=checkpoint))
            for t in range(0, int(until) + 1, 10)
        ]
    )


def test_a_straggler_sets_a_condition_and_lists_its_node() -> None:
    gang = straggling(300)
    p = plan(gang, at(300), failurePolicy={"stragglers": {"windowSeconds": 300}})
    found = cond(p, "Straggling")
    assert (found["status"], found["reason"]) == ("True", "StragglerDetected")
    assert "rank 2 (pod j-2 on node n3) takes 2s per step" in found["message"]
    assert "set failurePolicy.stragglers.action: Replace" in found["message"]
    assert p.status["stragglers"] == [
        {"rank": 2, "pod": "j-2", "node": "n3", "stepSeconds": 2.0, "medianStepSeconds": 1.0,
         "checkpointStep": 100}
    ]  # fmt: skip
    assert ("Warning", "StragglerDetected") in [(k, r) for k, r, _ in p.events]
    assert p.delete == []
    early = plan(gang, at(250), failurePolicy={"stragglers": {"windowSeconds": 300}})
    assert find(early.status["conditions"], "Straggling") is None
    assert early.requeue_after == pytest.approx(50.0)


def test_replace_avoids_the_node_and_restarts_at_the_next_checkpoint() -> None:
    policy = {"stragglers": {"windowSeconds": 60, "action": "Replace"}}
    first = plan(straggling(60, checkpoint=100), at(60), failurePolicy=policy)
    assert first.status["avoidedNodes"] == ["n3"]
    assert first.delete == [], "the gang keeps training until its next checkpoint"
    later = straggling(80, checkpoint=200)
    p = plan(later, at(80), status={**RUNNING_STATUS, **first.status}, failurePolicy=policy)
    restarting = cond(p, "Restarting")
    assert (restarting["status"], restarting["reason"]) == ("True", "StragglerReplaced")
    assert "at checkpoint 200" in restarting["message"]
    assert p.status["avoidedNodes"] == ["n3"]
    assert "stragglers" not in p.status
    # The new gang's pods may not land on the straggler's node.
    after = plan_trainjob(
        REF,
        make_job("j", nodes=4, failurePolicy=policy).build(),
        1,
        {**p.status, "conditions": []},
        World([], NODES),
        at(90),
    )
    terms = after.create[0]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n3"]} in terms[0][
        "matchExpressions"
    ]


def test_every_nested_status_field_the_planner_writes_is_in_the_schema() -> None:
    """The API server prunes fields its structural schema does not know: a nested key the
    planner writes but the model lacks would vanish between passes."""
    from datetime import timedelta as td

    from phalanx.api.trainjob import Goodput, QueueStatus, StragglerStatus
    from phalanx.plan.goodput import Observation, account
    from phalanx.plan.queue_wait import Wait

    def aliases(model: Any) -> set[str]:
        return {f.alias or name for name, f in model.model_fields.items()}

    policy = {"stragglers": {"windowSeconds": 60, "action": "Replace"}}
    p = plan(straggling(60, checkpoint=100), at(60), failurePolicy=policy)
    assert {k for s in p.status["stragglers"] for k in s} <= aliases(StragglerStatus)
    g = account(None, Observation(admitted=True, running=True, step=1, advanced=True), at(0))
    g = account(g, Observation(generation=2, restarted=True, step=5, checkpoint_step=2), at(9))
    g = account(g, Observation(generation=2, running=True, step=9, advanced=True), at(20))
    assert set(g) <= aliases(Goodput)
    assert set(Wait(1, at(0) + td(seconds=5), "ml/a").wire()) <= aliases(QueueStatus)


# --- a stretched poll cycle (plan/poll_budget.py): ranks asked over several rounds -----------


def stretched(
    steps_at: Callable[[int, float], int | None], until: float, ranks: int = 8, capacity: int = 4
) -> GangProgress:
    """Rounds every 10 s in which only the ranks `plan_round` picks are asked (rank 0 and the
    ranks asked longest ago, `capacity` a round); `steps_at(rank, t)` is what a rank answers
    at `t` (None: it does not answer)."""
    key = ("ml", "j")
    gang: GangProgress | None = None
    for t in range(0, int(until) + 1, 10):
        known = gang.ranks if gang is not None else {}
        targets = [
            PollTarget(key, r, known[r].polled_at if r in known else None) for r in range(ranks)
        ]
        asked = {x.rank: steps_at(x.rank, t) for x in plan_round(targets, capacity)}
        gang = observe_gang(gang, 1, answers(asked), at(t), 1.5)
    assert gang is not None
    return gang


def test_a_rank_not_yet_asked_again_in_a_stretched_cycle_is_not_silent() -> None:
    # Eight ranks, four asked a round: ranks 1..7 answer every third round (cycle_rounds 3).
    assert cycle_rounds(8, 1, 4) == 3
    gang = stretched(lambda rank, t: int(t), 200)
    assert gang.polled_at is not None
    assert any(
        p.answered_at is not None and p.answered_at < gang.polled_at for p in gang.ranks.values()
    ), "the case must leave ranks whose newest answer is older than the newest round"
    assert not any(gang.silent(r) for r in gang.ranks)
    # Training: rank 0 is asked every round, so the gang's step never reads as stalled.
    assert find_hang(gang, 45, at(200)) == (None, pytest.approx(45.0))
    # The whole gang stops at step 200, every rank still answering: everyone is named, not
    # the ranks merely waiting for their turn.
    hung = stretched(lambda rank, t: int(min(t, 200)), 300)
    found, _ = find_hang(hung, 45, at(300))
    assert found is not None
    assert found.everyone
    assert found.silent == tuple(range(8))


def test_a_rank_that_stops_answering_in_a_stretched_cycle_is_the_silent_one() -> None:
    # Rank 5 stops answering at 200 s; the others block in a collective at step 200.
    def steps(rank: int, t: float) -> int | None:
        if rank == 5 and t > 200:
            return None
        return int(min(t, 200))

    gang = stretched(steps, 300)
    assert [r for r in gang.ranks if gang.silent(r)] == [5]
    found, _ = find_hang(gang, 45, at(300))
    assert found is not None
    assert (found.step, found.silent, found.everyone) == (200, (5,), False)
    assert found.describe(gang).endswith("silent ranks 5 (pod j-5 on node n6)")


def test_a_rank_whose_pod_went_is_silent_though_nothing_is_sent_to_it() -> None:
    gang = poll(steady(40))
    gone = vanished(gang, 1, present=[0, 1, 3])
    assert gone == [RankAnswer(2, "j-2", "n3", None)]
    after = observe_gang(gang, 1, [*answers({0: 40, 1: 40, 3: 40}), *gone], at(50), 1.5)
    assert [r for r in after.ranks if after.silent(r)] == [2]
    assert vanished(gang, 2, present=[0]) == [], "a new gang starts from nothing"
