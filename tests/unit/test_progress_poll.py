"""The progress poller's shell (handlers/progress.py) under the poll budget: what one round
sends, what it folds in, and the cycle length it exports; against a stand-in HTTP session."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aiohttp
import pytest
from builders import make_job, pod

from phalanx import metrics
from phalanx.handlers import PROGRESS_BUDGET_ENV, progress, progress_budget_from_env
from phalanx.handlers.state import Operator

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
KEY = ("ml", "j")


class Response:
    status = 200

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    async def json(self, content_type: str | None = None) -> dict[str, Any]:
        return self.body


class Session:
    """Answers `/progress` of the ranks in `answering` with step 7, the others refuse; a
    rank is its pod's address's last byte (one rank a pod)."""

    def __init__(self, answering: set[int]) -> None:
        self.answering = answering
        self.asked: list[int] = []

    @contextlib.asynccontextmanager
    async def get(self, url: str) -> AsyncIterator[Response]:
        rank = int(url.removeprefix("http://").split(":")[0].split(".")[-1])
        self.asked.append(rank)
        if rank not in self.answering:
            raise aiohttp.ClientConnectionError("connection refused")
        yield Response({"step": 7, "stepSeconds": 1.0})


def running_job(nodes: int) -> Operator:
    """One Running job of `nodes` single-rank pods; pod r at 10.0.0.r, port 9400."""
    clock = iter(T0 + timedelta(seconds=10 * i) for i in range(1000))
    op = Operator(clock=lambda: next(clock))
    job = make_job("j", nodes=nodes, processesPerNode=1).manifest()
    job["status"] = {
        "gangGeneration": 1,
        "conditions": [{"type": "Running", "status": "True", "reason": "AllRanksRunning"}],
    }
    op.cache.trainjobs.put(job)
    for rank in range(nodes):
        member = pod("j", rank, 1, "Running", node=f"n{rank}")
        member["status"]["podIP"] = f"10.0.0.{rank}"
        op.cache.put_pod(member)
    return op


def test_a_round_sends_only_its_budget_rank_0_first_and_the_rest_in_turn() -> None:
    op = running_job(nodes=5)
    session = Session(answering={0, 1, 2, 3, 4})
    # 200 requests a second over 10 ms rounds: two requests a round for five ranks.
    budget, interval = 200.0, 0.01

    async def rounds() -> list[list[int]]:
        sent = []
        for _ in range(4):
            session.asked = []
            await progress.poll_once(op, cast(aiohttp.ClientSession, session), interval, budget)
            sent.append(session.asked)
        return sent

    assert asyncio.run(rounds()) == [[0, 1], [0, 2], [0, 3], [0, 4]]
    # Rank 0 and ceil(4 / 1) rounds of one more rank each.
    cycle = metrics.REGISTRY.get_sample_value("phalanx_progress_cycle_seconds")
    assert cycle == pytest.approx(4 * interval)
    gang = op.gangs[KEY]
    assert {r: p.answered_at for r, p in gang.ranks.items()} == {
        0: T0 + timedelta(seconds=30),
        1: T0,
        2: T0 + timedelta(seconds=10),
        3: T0 + timedelta(seconds=20),
        4: T0 + timedelta(seconds=30),
    }
    assert not any(gang.silent(r) for r in gang.ranks), "waiting for a turn is not silence"
    assert op.progress[KEY] == {"step": 7, "stepSeconds": 1.0}


def test_a_rank_that_refuses_its_turn_is_silent_and_one_whose_pod_went_too() -> None:
    op = running_job(nodes=3)
    session = Session(answering={0, 1})

    async def rounds(count: int) -> None:
        for _ in range(count):
            await progress.poll_once(op, cast(aiohttp.ClientSession, session), 1.0, 100.0)

    asyncio.run(rounds(1))  # everything fits: all three asked
    gang = op.gangs[KEY]
    assert [r for r in gang.ranks if gang.silent(r)] == [2]
    op.cache.drop_pod(op.cache.pods_of_job(KEY)[1])  # j-1 goes
    asyncio.run(rounds(1))
    gang = op.gangs[KEY]
    assert [r for r in gang.ranks if gang.silent(r)] == [1, 2]
    assert session.asked[-2:] == [0, 2], "nothing is sent to a rank without a pod"


@pytest.mark.parametrize("value", ["0", "-5", "lots", "inf", "nan"])
def test_a_budget_that_is_not_a_positive_number_stops_the_operator_naming_it(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROGRESS_BUDGET_ENV, value)
    with pytest.raises(ValueError, match=PROGRESS_BUDGET_ENV):
        progress_budget_from_env()


def test_the_budget_defaults_to_one_hundred_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_BUDGET_ENV, raising=False)
    assert progress_budget_from_env() == 100.0
    assert progress.in_flight_limit(100.0) == 200  # pacing at 100/s into 2 s timeouts
