"""Poll rank 0's `GET /progress` of every running job (contract: docs/progress-contract.md).

Unreachable or malformed endpoints are ignored: progress is a courtesy, never a reason for a
reconcile to fail.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from phalanx import observe
from phalanx.api.trainjob import LLMTrainJob
from phalanx.api.validate import SpecError
from phalanx.constants import LABEL_RANK
from phalanx.status import RUNNING, is_true

from .state import Key, Operator

log = logging.getLogger("phalanx.progress")
INTERVAL_SECONDS = 10.0
TIMEOUT_SECONDS = 2.0


def _targets(op: Operator) -> list[tuple[Key, str]]:
    targets = []
    for key, job in list(op.cache.trainjobs.items.items()):
        status = job.get("status") or {}
        if not is_true(status.get("conditions") or [], RUNNING):
            continue
        parsed = op.parsed(job, LLMTrainJob)
        if isinstance(parsed, SpecError):
            continue
        port = parsed.spec.trainer.metrics_port
        for pod in op.cache.pods_of_job(key):
            labels = pod["metadata"].get("labels") or {}
            ip = (pod.get("status") or {}).get("podIP")
            if labels.get(LABEL_RANK) == "0" and ip and not observe.terminating(pod):
                targets.append((key, f"http://{ip}:{port}/progress"))
    return targets


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
    targets = _targets(op)
    reports = await asyncio.gather(*(_fetch(session, url) for _, url in targets))
    for (key, _), report in zip(targets, reports, strict=True):
        if report is not None and op.progress.get(key) != report:
            op.progress[key] = report
            op.trainjobs.add(key)


async def progress_loop(op: Operator, interval: float = INTERVAL_SECONDS) -> None:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                await poll_once(op, session)
            except Exception:
                log.exception("progress poll failed")
            await asyncio.sleep(interval)
