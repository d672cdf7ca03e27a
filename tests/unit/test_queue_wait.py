"""Why a queued gang waits and until when (plan/queue_wait.py): position in the queue and an
estimated start from the running jobs' ETAs, replayed through admission."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from builders import cluster, gang
from builders.cluster import GENERIC

from phalanx.placement import CapacitySnapshot
from phalanx.plan.queue_wait import Finish, Wait, estimate_waits, human

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
HOSTS = [f"z0b0r0h{h}" for h in range(4)]


def futures() -> list[tuple[Finish, CapacitySnapshot]]:
    """One rack of 4 hosts: job a (hosts 0-1) ends in 100 s, job b (hosts 2-3) in 600 s."""
    rack = cluster().hosts(4)
    return [
        (Finish("ml/a", 100), rack.busy(*HOSTS[2:]).snapshot()),
        (Finish("ml/b", 600), cluster().hosts(4).snapshot()),
    ]


def test_each_gang_starts_when_enough_running_jobs_end_behind_those_ahead_of_it() -> None:
    queued = [gang(2, key="ml/small", created=1), gang(4, key="ml/big", created=2)]
    waits = estimate_waits(queued, futures(), GENERIC, NOW)
    assert waits == {
        "ml/small": Wait(1, NOW + timedelta(seconds=100), "ml/a"),
        # Once b ends too, small (ahead in the queue) holds half the rack: no estimate.
        "ml/big": Wait(2),
    }


def test_alone_a_whole_rack_gang_starts_when_the_last_job_in_it_ends() -> None:
    waits = estimate_waits([gang(4, key="ml/big")], futures(), GENERIC, NOW)
    assert waits == {"ml/big": Wait(1, NOW + timedelta(seconds=600), "ml/b")}


def test_no_running_job_with_an_eta_means_no_estimate() -> None:
    assert estimate_waits([gang(2, key="ml/x")], [], GENERIC, NOW) == {"ml/x": Wait(1)}


def test_the_wait_in_words_and_on_the_wire() -> None:
    wait = Wait(2, NOW + timedelta(seconds=720), "ml/a")
    assert wait.describe(NOW) == (
        "Position 2 in the admission queue; estimated start in ~12m, when ml/a finishes."
    )
    assert wait.wire() == {
        "position": 2,
        "estimatedStartTime": "2026-01-01T12:12:00Z",
        "after": "ml/a",
    }
    assert Wait(1).wire() == {"position": 1}
    assert "no start estimate" in Wait(1).describe(NOW)
    assert [human(s) for s in (5, 89, 600, 7200)] == ["~5s", "~89s", "~10m", "~2.0h"]


def test_the_planner_shows_the_wait_while_queued_and_drops_it_once_placed() -> None:
    from builders import make_job, pod

    from phalanx.plan.trainjob import World, plan_trainjob
    from phalanx.render.trainjob import JobRef

    ref, spec = JobRef("j", "ml", "uid-1"), make_job("j", nodes=2).build()
    wait = Wait(3, NOW + timedelta(seconds=600), "ml/a")
    gated = [pod("j", r, 1, gated=True) for r in range(2)]
    verdict = ("InsufficientCapacity", "no room. " + wait.describe(NOW))
    queued = plan_trainjob(ref, spec, 1, {}, World(gated, frozenset(), verdict, wait=wait), NOW)
    assert queued.status["queue"] == wait.wire()
    running = [pod("j", r, 1, "Running", node=f"n{r}") for r in range(2)]
    placed = plan_trainjob(
        ref, spec, 1, queued.status, World(running, frozenset({"n0", "n1"})), NOW
    )
    assert "queue" not in placed.status
