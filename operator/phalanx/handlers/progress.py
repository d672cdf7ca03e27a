"""Poll `GET /progress` of every rank of every running gang (docs/progress-contract.md).

Each pod runs `processesPerNode` ranks, each serving on the metrics port plus its local rank.
One poll round folds its answers into the job's `GangProgress` (`plan.gang_progress`): rank
0's report feeds `status.progress`, every rank's step and step time feed hang and straggler
detection and the goodput timeline. A job is reconciled when what it acts on changed (a step,
an answer that appeared or vanished, a rank turning slow), not on every poll.

Polling is bounded (`PHALANX_PROGRESS_BUDGET` requests per second over every gang): a round
asks what `plan.poll_budget` picks, every rank 0 and the ranks asked longest ago, its requests
paced at the budget and at most `in_flight_limit` of them open at once. When the ranks
exceed one interval's budget the cycle stretches over several rounds; no rank is dropped.

Unreachable or malformed endpoints count as a rank that did not answer; they never make a
reconcile fail.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from phalanx import metrics, observe
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError
from phalanx.plan.gang_progress import RankAnswer, observe_gang, vanished
from phalanx.plan.poll_budget import PollTarget, cycle_rounds, plan_round, round_capacity
from phalanx.status import RUNNING, is_true

from .state import Key, Operator

log = logging.getLogger("phalanx.progress")
INTERVAL_SECONDS = 10.0
TIMEOUT_SECONDS = 2.0
# Requests per second over every gang. One interval's worth (1,000 at the defaults) covers a
# 996-rank gang every round; beyond that the cycle stretches instead of the operator's CPU.
BUDGET_PER_SECOND = 100.0


@dataclass(frozen=True)
class Endpoint:
    rank: int  # global rank
    pod: str
    node: str
    url: str


@dataclass(frozen=True)
class Gang:
    key: Key
    generation: int
    straggler_factor: float
    endpoints: list[Endpoint]


def _targets(op: Operator) -> list[Gang]:
    gangs = []
    for key, job in list(op.cache.trainjobs.items.items()):
        status = job.get("status") or {}
        if not is_true(status.get("conditions") or [], RUNNING):
            continue
        parsed = op.parsed(job, LLMTrainJob)
        if isinstance(parsed, SpecError):
            continue
        spec = parsed.spec
        port, per_pod = spec.trainer.metrics_port, spec.nproc_per_node()
        generation = int(status.get("gangGeneration") or 1)
        endpoints = []
        for pod in op.cache.pods_of_job(key):
            ip = (pod.get("status") or {}).get("podIP")
            if observe.generation(pod) != generation or not ip or observe.terminating(pod):
                continue
            first = observe.rank(pod) * per_pod
            endpoints += [
                Endpoint(
                    first + local,
                    observe.name(pod),
                    observe.node_of(pod),
                    f"http://{ip}:{port + local}/progress",
                )
                for local in range(per_pod)
            ]
        gangs.append(Gang(key, generation, spec.failure_policy.stragglers.factor, endpoints))
    return gangs


async def _fetch(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url) as response:
            if response.status != 200:
                return None
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def poll_targets(op: Operator, gangs: Sequence[Gang]) -> list[PollTarget]:
    """Every endpoint, with when its rank was last asked in the gang's current generation."""
    targets = []
    for gang in gangs:
        known = op.gangs.get(gang.key)
        asked = known.ranks if known is not None and known.generation == gang.generation else {}
        targets += [
            PollTarget(gang.key, e.rank, asked[e.rank].polled_at if e.rank in asked else None)
            for e in gang.endpoints
        ]
    return targets


def in_flight_limit(budget: float) -> int:
    """Requests open at once: what pacing at the budget needs when every request runs into the
    timeout, so the bound never slows a round below the budget."""
    return max(1, math.ceil(budget * TIMEOUT_SECONDS))


async def _fetch_paced(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    budget: float,
    in_flight: asyncio.Semaphore,
) -> list[dict[str, Any] | None]:
    """Every url's report, the i-th request sent i/budget seconds into the round, so a round
    is spread over its interval rather than a burst that holds up the event loop."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(index: int, url: str) -> dict[str, Any] | None:
        delay = start + index / budget - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        async with in_flight:
            return await _fetch(session, url)

    return list(await asyncio.gather(*(one(i, url) for i, url in enumerate(urls))))


async def poll_once(
    op: Operator,
    session: aiohttp.ClientSession,
    interval: float = INTERVAL_SECONDS,
    budget: float = BUDGET_PER_SECOND,
    in_flight: asyncio.Semaphore | None = None,
) -> None:
    """One round: ask the endpoints the budget allows and fold their answers in."""
    gangs = _targets(op)
    targets = poll_targets(op, gangs)
    capacity = round_capacity(budget, interval)
    leaders = sum(1 for t in targets if t.leader)
    metrics.PROGRESS_CYCLE.set(cycle_rounds(len(targets), leaders, capacity) * interval)
    endpoints = {(g.key, e.rank): e for g in gangs for e in g.endpoints}
    chosen = plan_round(targets, capacity)
    asked = [endpoints[t.gang, t.rank] for t in chosen]
    limit = in_flight if in_flight is not None else asyncio.Semaphore(in_flight_limit(budget))
    reports = await _fetch_paced(session, [e.url for e in asked], budget, limit)
    answered: dict[Key, list[RankAnswer]] = defaultdict(list)
    for target, endpoint, report in zip(chosen, asked, reports, strict=True):
        answered[target.gang].append(RankAnswer(endpoint.rank, endpoint.pod, endpoint.node, report))
    now = op.clock()
    for gang in gangs:
        before = op.gangs.get(gang.key)
        present = {e.rank for e in gang.endpoints}
        answers = answered.get(gang.key, []) + vanished(before, gang.generation, present)
        if gang.endpoints and not answers:
            continue  # none of its ranks had a turn this round: nothing new to fold in
        after = observe_gang(before, gang.generation, answers, now, gang.straggler_factor)
        op.gangs[gang.key] = after
        if after.leader is not None and op.progress.get(gang.key) != after.leader:
            op.progress[gang.key] = dict(after.leader)
        if before is None or before.signature() != after.signature():
            op.trainjobs.add(gang.key)


async def progress_loop(
    op: Operator, interval: float = INTERVAL_SECONDS, budget: float = BUDGET_PER_SECOND
) -> None:
    limit = in_flight_limit(budget)
    in_flight = asyncio.Semaphore(limit)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    # The pool holds every request the semaphore lets through: one queued for a connection
    # would spend its timeout waiting and read as a rank that did not answer.
    connector = aiohttp.TCPConnector(limit=limit)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        while True:
            started = loop.time()
            try:
                await poll_once(op, session, interval, budget, in_flight)
            except Exception:
                log.exception("progress poll failed")
            # Rounds start an interval apart: a round paced over its interval is not
            # followed by a whole interval of idling on top.
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
