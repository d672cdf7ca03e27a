"""Poll `GET /progress` of every rank of every running gang (docs/progress-contract.md).

Each pod runs `processesPerNode` ranks, each serving on the metrics port plus its local rank.
One poll folds every answer into the job's `GangProgress` (`plan.gang_progress`): rank 0's
report feeds `status.progress`, every rank's step and step time feed hang and straggler
detection and the goodput timeline. A job is reconciled when what it acts on changed (a step,
an answer that appeared or vanished, a rank turning slow), not on every poll.

Unreachable or malformed endpoints count as a rank that did not answer; they never make a
reconcile fail.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from phalanx import observe
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError
from phalanx.plan.gang_progress import RankAnswer, observe_gang
from phalanx.status import RUNNING, is_true

from .state import Key, Operator

log = logging.getLogger("phalanx.progress")
INTERVAL_SECONDS = 10.0
TIMEOUT_SECONDS = 2.0


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


async def poll_once(op: Operator, session: aiohttp.ClientSession) -> None:
    gangs = _targets(op)
    urls = [e.url for g in gangs for e in g.endpoints]
    reports = iter(await asyncio.gather(*(_fetch(session, url) for url in urls)))
    now = op.clock()
    for gang in gangs:
        answers = [RankAnswer(e.rank, e.pod, e.node, next(reports)) for e in gang.endpoints]
        before = op.gangs.get(gang.key)
        after = observe_gang(before, gang.generation, answers, now, gang.straggler_factor)
        op.gangs[gang.key] = after
        if after.leader is not None and op.progress.get(gang.key) != after.leader:
            op.progress[gang.key] = dict(after.leader)
        if before is None or before.signature() != after.signature():
            op.trainjobs.add(gang.key)


async def progress_loop(op: Operator, interval: float = INTERVAL_SECONDS) -> None:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                await poll_once(op, session)
            except Exception:
                log.exception("progress poll failed")
            await asyncio.sleep(interval)
