"""Merge a user's partial pod template over a rendered pod, strategic-merge style."""

from __future__ import annotations

import copy
from typing import Any

# Lists of objects that Kubernetes merges by a key rather than replacing wholesale.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
# Lists the user extends rather than replaces (both sides' entries apply).
APPEND = {"tolerations", "topologySpreadConstraints", "hostAliases"}


def merge(base: Any, overlay: Any, key: str = "") -> Any:
    """`overlay` merged into a copy of `base`; maps merge deeply, keyed lists merge by key."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for name, value in overlay.items():
            merged[name] = merge(base[name], value, name) if name in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(overlay, list):
        if key in MERGE_KEYS:
            return _merge_by_key(base, overlay, MERGE_KEYS[key])
        if key in APPEND:
            return [*base, *copy.deepcopy(overlay)]
    return copy.deepcopy(overlay)


def _merge_by_key(base: list[Any], overlay: list[Any], field: str) -> list[Any]:
    merged = list(base)
    index = {item.get(field): i for i, item in enumerate(merged) if isinstance(item, dict)}
    for item in overlay:
        position = index.get(item.get(field)) if isinstance(item, dict) else None
        if position is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[position] = merge(merged[position], item)
    return merged
