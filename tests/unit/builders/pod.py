"""Train job pods as the API server returns them, in any state of their life."""

from __future__ import annotations

from typing import Any

from phalanx.constants import GANG_GATE, LABEL_GENERATION, LABEL_JOB, LABEL_RANK


def pod(
    job: str,
    rank: int,
    generation: int = 1,
    phase: str = "Pending",
    node: str | None = None,
    gated: bool = False,
    exit_code: int | None = None,
    reason: str | None = None,
    terminating: str | None = None,
    message: str | None = None,
    pod_reason: str | None = None,
    waiting: tuple[str, str] | None = None,
    image: str = "trainer:1",
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {
            "name": f"{job}-{rank}",
            "namespace": "ml",
            "labels": {LABEL_JOB: job, LABEL_RANK: str(rank), LABEL_GENERATION: str(generation)},
        },
        "spec": {"containers": [{"name": "trainer", "image": image}]},
        "status": {"phase": phase},
    }
    if node:
        obj["spec"]["nodeName"] = node
    if gated:
        obj["spec"]["schedulingGates"] = [{"name": GANG_GATE}]
    if exit_code is not None:
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason or "Error"}
        if message is not None:
            terminated["message"] = message
        obj["status"]["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": terminated}}
        ]
    if waiting is not None:
        obj["status"]["containerStatuses"] = [
            {
                "name": "trainer",
                "image": image,
                "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}},
            }
        ]
    if pod_reason is not None:
        obj["status"]["reason"] = pod_reason
    if terminating:
        obj["metadata"]["deletionTimestamp"] = terminating
        obj["metadata"]["deletionGracePeriodSeconds"] = 0
    return obj
