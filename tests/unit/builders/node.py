"""Nodes as the API server returns them, Ready or not since a given time."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def node(name: str, ready: bool, since: datetime) -> dict[str, Any]:
    condition = {
        "type": "Ready",
        "status": "True" if ready else "False",
        "lastTransitionTime": since.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return {"metadata": {"name": name, "namespace": ""}, "status": {"conditions": [condition]}}
