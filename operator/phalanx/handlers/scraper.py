"""Scrape each ready leader's `/metrics` for the built-in autoscaler.

Every interval, for every InferenceService with `spec.autoscaling`, the loop reads
`phalanx_serve_num_requests_running` and `phalanx_serve_num_requests_waiting` from its ready
leaders, records one `Sample` (scaled up to all ready leaders when some did not answer) and
queues the service, whose reconcile asks the autoscaler. Unreachable endpoints are skipped:
scraping is best effort and never fails a reconcile.

PHALANX_SCRAPE_INTERVAL sets the period (0 turns scraping off); PHALANX_SCRAPE_LOOPBACK_ONLY=1
dials loopback addresses only (for an operator outside a dev cluster whose fake pods have
loopback addresses, on a machine that cannot give the cluster its own network namespace).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from datetime import UTC, datetime

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from phalanx import observe
from phalanx.api.inference import InferenceService
from phalanx.api.validate import SpecError, parse
from phalanx.constants import LABEL_WORKER_INDEX
from phalanx.observe import pod_ready
from phalanx.plan.autoscale import Sample, trim

from .state import Key, Operator

log = logging.getLogger("phalanx.scraper")
INTERVAL_SECONDS = 15.0
TIMEOUT_SECONDS = 2.0
RUNNING = "phalanx_serve_num_requests_running"
WAITING = "phalanx_serve_num_requests_waiting"


def parse_load(text: str) -> tuple[float, float] | None:
    """(running, waiting) summed over label sets, or None when the page has neither gauge."""
    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in (RUNNING, WAITING):
                    totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    except ValueError:
        return None
    if not totals:
        return None
    return totals.get(RUNNING, 0.0), totals.get(WAITING, 0.0)


def _dialable(ip: str, loopback_only: bool) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return address.is_loopback or not loopback_only


def targets(op: Operator, loopback_only: bool) -> dict[Key, list[str]]:
    """Metrics URLs of the ready leaders of every autoscaled service."""
    found: dict[Key, list[str]] = {}
    for key, obj in list(op.cache.services.items.items()):
        if observe.terminating(obj):
            continue
        parsed = op.parsed(obj, InferenceService)
        if isinstance(parsed, SpecError) or parsed.spec.autoscaling is None:
            continue
        port = parsed.spec.server.port
        urls = found.setdefault(key, [])
        for pod in op.cache.pods_of_service(key):
            ip = (pod.get("status") or {}).get("podIP")
            leader = (pod["metadata"].get("labels") or {}).get(LABEL_WORKER_INDEX) == "0"
            if leader and ip and pod_ready(pod) and _dialable(str(ip), loopback_only):
                urls.append(f"http://{ip}:{port}/metrics")
    return found


async def _fetch(session: aiohttp.ClientSession, url: str) -> tuple[float, float] | None:
    try:
        async with session.get(url) as response:
            if response.status != 200:
                return None
            return parse_load(await response.text())
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        return None


async def scrape_once(op: Operator, session: aiohttp.ClientSession, loopback_only: bool) -> None:
    for key, urls in targets(op, loopback_only).items():
        if not urls:
            continue
        answers = [a for a in await asyncio.gather(*(_fetch(session, u) for u in urls)) if a]
        if not answers:
            continue
        # Leaders that did not answer are assumed as busy as those that did.
        scale = len(urls) / len(answers)
        now = datetime.now(UTC)
        sample = Sample(
            at=now,
            running=sum(a[0] for a in answers) * scale,
            waiting=sum(a[1] for a in answers) * scale,
            leaders=len(urls),
        )
        obj = op.cache.services.get(key)
        try:
            spec = parse(obj, InferenceService).spec if obj is not None else None
        except SpecError:
            spec = None
        if spec is None or spec.autoscaling is None:
            continue
        op.samples[key] = trim([*op.samples.get(key, []), sample], spec.autoscaling, now)
        op.services.add(key)


async def scraper_loop(op: Operator, interval: float, loopback_only: bool) -> None:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                await scrape_once(op, session, loopback_only)
            except Exception:
                log.exception("metrics scrape failed")
            await asyncio.sleep(interval)
