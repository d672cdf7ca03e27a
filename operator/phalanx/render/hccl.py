"""The HCCL rank table (MindCluster's hccl.json, version 1.0) for Ascend jobs.

The Ascend device plugin writes each pod's allocated NPUs into a pod annotation once the pod
is bound; until every rank's annotation is known the table says `initializing`, and the
training processes wait for `completed`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

DEVICE_ANNOTATION = "ascend.kubectl.kubernetes.io/ascend-910-configuration"


def pod_devices(pod: Mapping[str, Any]) -> list[dict[str, str]] | None:
    """The NPUs the device plugin allocated to a pod, or None while unknown or unreadable."""
    raw = pod.get("metadata", {}).get("annotations", {}).get(DEVICE_ANNOTATION)
    if not raw:
        return None
    try:
        devices = json.loads(raw).get("devices")
    except (ValueError, AttributeError):
        return None
    if not isinstance(devices, list) or not devices:
        return None
    return [
        {"device_id": str(d.get("device_id", "")), "device_ip": str(d.get("device_ip", ""))}
        for d in devices
    ]


def rank_table(
    pods_by_rank: Sequence[Mapping[str, Any] | None], devices_per_pod: int
) -> dict[str, Any]:
    """hccl.json for the gang; rank_id = node rank * devices per pod + device index."""
    servers: list[dict[str, Any]] = []
    for rank, pod in enumerate(pods_by_rank):
        devices = pod_devices(pod) if pod is not None else None
        if pod is None or devices is None or len(devices) != devices_per_pod:
            return {
                "status": "initializing",
                "version": "1.0",
                "server_count": "0",
                "server_list": [],
            }
        status = pod.get("status", {})
        servers.append(
            {
                "server_id": status.get("hostIP", ""),
                "container_ip": status.get("podIP", ""),
                "device": [
                    {**device, "rank_id": str(rank * devices_per_pod + index)}
                    for index, device in enumerate(devices)
                ],
            }
        )
    return {
        "status": "completed",
        "version": "1.0",
        "server_count": str(len(servers)),
        "server_list": servers,
    }
