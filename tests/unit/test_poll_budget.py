"""The progress poll budget (plan/poll_budget.py): which endpoints a round asks, and how
long the cycle in which every rank is asked once stretches."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from phalanx.plan.poll_budget import PollTarget, cycle_rounds, plan_round, round_capacity

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
Endpoint = tuple[tuple[str, str], int]


def endpoints(*sizes: int) -> list[Endpoint]:
    """Gangs ml/g0, ml/g1, ... of `sizes` ranks each."""
    return [(("ml", f"g{g}"), rank) for g, size in enumerate(sizes) for rank in range(size)]


def run_rounds(
    every: list[Endpoint], capacity: int, rounds: int, interval: float = 10.0
) -> list[list[Endpoint]]:
    """What each of `rounds` rounds asks, each asked endpoint stamped with its round's time
    (as the shell's fold stamps a rank's `polled_at`)."""
    asked: dict[Endpoint, datetime] = {}
    planned = []
    for index in range(rounds):
        now = T0 + timedelta(seconds=index * interval)
        targets = [PollTarget(gang, rank, asked.get((gang, rank))) for gang, rank in every]
        chosen = [(t.gang, t.rank) for t in plan_round(targets, capacity)]
        asked.update(dict.fromkeys(chosen, now))
        planned.append(chosen)
    return planned


@pytest.mark.parametrize(
    ("budget", "interval", "expected"),
    [
        pytest.param(100, 10, 1000, id="defaults"),
        pytest.param(0.3, 10, 3, id="decimal-product-not-rounded-down"),
        pytest.param(0.01, 10, 1, id="at-least-one"),
        pytest.param(100, 2.5, 250, id="fractional-interval"),
    ],
)
def test_round_capacity_is_one_interval_of_the_budget(
    budget: float, interval: float, expected: int
) -> None:
    assert round_capacity(budget, interval) == expected


@pytest.mark.parametrize(
    ("sizes", "budget", "interval"),
    [
        pytest.param((2500,), 100, 10, id="one-2500-rank-gang"),
        pytest.param((996, 500, 8, 8), 50, 10, id="mixed-gangs"),
        pytest.param((64,) * 12, 10, 5, id="many-gangs"),
        pytest.param((7, 5), 0.5, 10, id="five-a-round"),
    ],
)
def test_a_stretched_cycle_asks_every_rank_within_its_rounds_and_rank_0_every_round(
    sizes: tuple[int, ...], budget: float, interval: float
) -> None:
    every = endpoints(*sizes)
    capacity = round_capacity(budget, interval)
    assert len(every) > capacity, "the case must exceed one interval's budget"
    leaders = len(sizes)
    rounds = cycle_rounds(len(every), leaders, capacity)
    assert rounds == math.ceil((len(every) - leaders) / (capacity - leaders))
    planned = run_rounds(every, capacity, 3 * rounds, interval)
    for chosen in planned:
        assert len(chosen) <= capacity, "a round over the budget"
        assert len(set(chosen)) == len(chosen)
        assert {(("ml", f"g{g}"), 0) for g in range(len(sizes))} <= set(chosen)
    # Not only the first cycle: any `rounds` consecutive rounds ask every endpoint.
    for start in range(len(planned) - rounds + 1):
        window = {e for chosen in planned[start : start + rounds] for e in chosen}
        assert window == set(every), f"rounds {start}..{start + rounds - 1} missed a rank"


def test_the_ranks_asked_longest_ago_go_first_and_new_ones_before_them() -> None:
    gang = ("ml", "g")
    at = [T0 + timedelta(seconds=s) for s in range(4)]
    targets = [
        PollTarget(gang, 0, at[3]),
        PollTarget(gang, 1, at[2]),
        PollTarget(gang, 2, at[0]),
        PollTarget(gang, 3, None),  # its pod got an address since the last round
        PollTarget(gang, 4, at[1]),
    ]
    assert [t.rank for t in plan_round(targets, 3)] == [0, 3, 2]


def test_everything_is_asked_when_it_fits() -> None:
    every = endpoints(996)
    assert cycle_rounds(len(every), 1, round_capacity(100, 10)) == 1
    assert run_rounds(every, 1000, 2) == [every, every]
    assert cycle_rounds(0, 0, 1000) == 1


def test_more_gangs_than_a_round_holds_rotate_their_leaders_too() -> None:
    """A budget below one request per gang per interval: the budget still holds and no rank
    starves, leaders included."""
    every = endpoints(4, 4, 4)
    capacity = round_capacity(0.2, 10)  # two requests a round for three gangs
    rounds = cycle_rounds(len(every), 3, capacity)
    assert rounds == 6
    planned = run_rounds(every, capacity, rounds)
    assert all(len(chosen) == capacity for chosen in planned)
    assert {e for chosen in planned for e in chosen} == set(every)
