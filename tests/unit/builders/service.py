"""InferenceServices: specs and the pods of one group as the API server returns them."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from phalanx.api.inference import InferenceService, InferenceServiceSpec
from phalanx.render.inference import ModelMount, ServiceRef, render_group

SERVICE = ServiceRef("chat", "ml", "uid-9")
TINY = ModelMount(path="builtin:tiny", revision="builtin:tiny")


def make_service(**fields: Any) -> InferenceServiceSpec:
    fields.setdefault("model", {"builtin": "tiny"})
    return InferenceService.model_validate({"spec": fields}).spec


def group_pods(
    spec: InferenceServiceSpec,
    index: int,
    revision: str,
    now: datetime,
    ready: bool = True,
    age: float = 60,
    **pod_status: Any,
) -> list[dict[str, Any]]:
    """The pods of one group as the API returns them: bound, Running and Ready (or not)."""
    pods = render_group(SERVICE, spec, TINY, index, revision)
    created = (now - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for n, pod in enumerate(pods):
        pod["metadata"]["creationTimestamp"] = created
        pod["spec"].pop("schedulingGates", None)
        pod["spec"]["nodeName"] = f"n{n + 1}"
        pod["status"] = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            **pod_status,
        }
    return pods
