"""Leader election over a `coordination.k8s.io` Lease, as client-go's leaderelection does.

One admission loop promises capacity, so only one replica may decide at a time. Every replica
watches and fills its cache (a hot standby); only the holder of the Lease runs the reconcile
workers, the admission loop and the pollers. The holder renews the Lease every
`retry` seconds; a replica that has not managed to renew within `renew_deadline` stops
deciding before its `duration` runs out, so two never decide at once. A standby takes over
once it has seen the same Lease record unchanged for `duration` seconds of its own clock
(never comparing clocks across machines). A holder that stops cleanly hands the Lease back.

Enabled with PHALANX_LEADER_ELECTION=1; PHALANX_LEADER_NAMESPACE (else POD_NAMESPACE, else
`default`), PHALANX_LEADER_LEASE (name, `phalanx-operator`) and PHALANX_LEASE_SECONDS (15)
configure it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from phalanx import kube, metrics

log = logging.getLogger("phalanx.leader")


def _micro_time(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def may_take(
    record: Mapping[str, Any] | None, me: str, unchanged_for: float, duration: float
) -> bool:
    """Whether `me` may hold the Lease whose spec is `record`, seen unchanged for
    `unchanged_for` seconds: nobody holds it, `me` does, or its holder stopped renewing."""
    if record is None:
        return True
    holder = str(record.get("holderIdentity") or "")
    if not holder or holder == me:
        return True
    return unchanged_for >= float(record.get("leaseDurationSeconds") or duration)


@dataclass
class LeaderElection:
    name: str
    namespace: str
    identity: str
    duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0
    clock: Callable[[], float] = time.monotonic
    _seen: tuple[str, ...] | None = field(default=None, init=False)
    _seen_at: float = field(default=0.0, init=False)

    @classmethod
    def from_env(cls) -> LeaderElection | None:
        if os.environ.get("PHALANX_LEADER_ELECTION") != "1":
            return None
        namespace = (
            os.environ.get("PHALANX_LEADER_NAMESPACE")
            or os.environ.get("POD_NAMESPACE")
            or "default"
        )
        duration = float(os.environ.get("PHALANX_LEASE_SECONDS", "15"))
        identity = f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        return cls(
            name=os.environ.get("PHALANX_LEADER_LEASE", "phalanx-operator"),
            namespace=namespace,
            identity=identity,
            duration=duration,
            renew_deadline=duration * 2 / 3,
            retry=max(duration / 7.5, 0.2),
        )

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking: run it in a thread). True while this replica holds the Lease."""
        lease = kube.get_lease(self.namespace, self.name)
        now = datetime.now(UTC)
        record = None if lease is None else dict(lease.get("spec") or {})
        if record is not None:
            key = tuple(
                str(record.get(k) or "")
                for k in ("holderIdentity", "renewTime", "leaseTransitions")
            )
            if key != self._seen:
                self._seen, self._seen_at = key, self.clock()
        unchanged_for = self.clock() - self._seen_at
        if not may_take(record, self.identity, unchanged_for, self.duration):
            return False
        holder = str((record or {}).get("holderIdentity") or "")
        transitions = int((record or {}).get("leaseTransitions") or 0)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "renewTime": _micro_time(now),
            "acquireTime": (record or {}).get("acquireTime") if holder == self.identity else None,
            "leaseTransitions": transitions if holder in ("", self.identity) else transitions + 1,
        }
        if spec["acquireTime"] is None:
            spec["acquireTime"] = _micro_time(now)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            return kube.create_lease(self.namespace, body) is not None
        # The resourceVersion makes the write conditional: of two replicas racing, one wins.
        body = {**lease, "spec": spec}
        return kube.replace_lease(self.namespace, self.name, body) is not None

    async def acquire(self) -> None:
        """Return once this replica holds the Lease."""
        while True:
            try:
                if await asyncio.to_thread(self.try_acquire_or_renew):
                    log.info(
                        "leading as %s (lease %s/%s)", self.identity, self.namespace, self.name
                    )
                    return
            except Exception as error:  # the API server may be away; keep standing by
                log.warning("lease %s/%s: %s", self.namespace, self.name, error)
            await asyncio.sleep(self.retry)

    async def hold(self) -> None:
        """Renew until a renewal has not succeeded for `renew_deadline`; then return."""
        renewed = self.clock()
        while True:
            await asyncio.sleep(self.retry)
            try:
                ok = await asyncio.wait_for(
                    asyncio.to_thread(self.try_acquire_or_renew), self.renew_deadline
                )
            except Exception as error:
                log.warning("renewing lease %s/%s: %s", self.namespace, self.name, error)
                ok = False
            if ok:
                renewed = self.clock()
            elif self.clock() - renewed >= self.renew_deadline:
                log.warning("lost lease %s/%s; standing by", self.namespace, self.name)
                return

    def release(self) -> None:
        """Hand the Lease back (blocking), so a standby need not wait for it to expire."""
        lease = kube.get_lease(self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        spec = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1}
        kube.replace_lease(self.namespace, self.name, {**lease, "spec": spec})


async def lead(election: LeaderElection, start: Callable[[], list[asyncio.Task[None]]]) -> None:
    """Run `start`'s tasks only while holding the Lease; stop them the moment it is lost."""
    while True:
        await election.acquire()
        metrics.LEADER.set(1)
        tasks = start()
        try:
            await election.hold()
        finally:
            metrics.LEADER.set(0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
