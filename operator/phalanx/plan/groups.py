"""The groups of an InferenceService (LeaderWorkerSet-style replicas) and when one has failed.

A replica is `nodesPerReplica` pods; a group that lost a member is recreated whole. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from phalanx import observe
from phalanx.constants import LABEL_GROUP_INDEX, LABEL_WORKER_INDEX
from phalanx.render.inference import CONTAINER as SERVER_CONTAINER
from phalanx.render.inference import LABEL_REVISION

Pod = Mapping[str, Any]


@dataclass(frozen=True)
class Group:
    """The observed pods of one replica."""

    index: int
    pods: tuple[Pod, ...]

    @property
    def revision(self) -> str:
        revisions = {observe.labels(p).get(LABEL_REVISION, "") for p in self.pods}
        return revisions.pop() if len(revisions) == 1 else ""

    def workers(self) -> dict[int, Pod]:
        return {observe.int_label(p, LABEL_WORKER_INDEX): p for p in self.pods}

    def leaving(self) -> bool:
        """Every pod is being deleted: the group is on its way out (its index stays taken)."""
        return all(observe.terminating(p) for p in self.pods)

    def ready(self, size: int) -> bool:
        return len(self.pods) == size and all(observe.pod_ready(p) for p in self.pods)

    def created(self) -> datetime | None:
        times = [observe.created(p) for p in self.pods]
        known = [t for t in times if t is not None]
        return min(known) if known else None


def groups_of(pods: Sequence[Pod]) -> dict[int, Group]:
    by_index: dict[int, list[Pod]] = {}
    for pod in pods:
        by_index.setdefault(observe.int_label(pod, LABEL_GROUP_INDEX), []).append(pod)
    return {
        index: Group(index, tuple(sorted(members, key=observe.name)))
        for index, members in sorted(by_index.items())
    }


def _ended(pod: Pod) -> str:
    ended = observe.termination(pod, SERVER_CONTAINER)
    return f"exit code {ended.exit_code}" if ended.exit_code is not None else ended.reason


def group_failure(group: Group, size: int, ready_nodes: frozenset[str]) -> str | None:
    """Why this group can no longer serve as a whole, or None while it still can."""
    for pod in group.pods:
        status = pod.get("status") or {}
        node = str(pod.get("spec", {}).get("nodeName") or "")
        if status.get("phase") in ("Failed", "Succeeded"):
            return f"pod {observe.name(pod)} ended ({status.get('phase')}, {_ended(pod)})"
        if node and node not in ready_nodes:
            return f"pod {observe.name(pod)} lost its node {node}"
        if observe.terminating(pod):
            return f"pod {observe.name(pod)} was deleted"
        if size > 1:
            for container in status.get("containerStatuses") or []:
                if int(container.get("restartCount") or 0) > 0:
                    # Peers of a multi-host engine cannot rejoin a restarted member.
                    return f"a container of pod {observe.name(pod)} restarted"
    if len(group.pods) < size and any(not observe.gated(p) for p in group.pods):
        missing = sorted(set(range(size)) - set(group.workers()))
        return f"worker {missing[0] if missing else '?'} of an admitted group is missing"
    return None
