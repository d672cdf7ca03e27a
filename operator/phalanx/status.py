"""Conditions (Kubernetes API conventions), the status draft both planners fill, the status
patch the shell writes, the derived phase, and progress formatting. Pure."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, TypedDict, TypeVar, cast

Condition = dict[str, Any]

# Train job condition types, in the order they are shown.
ADMITTED = "Admitted"
RUNNING = "Running"
RESTARTING = "Restarting"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
STRAGGLING = "Straggling"  # a rank is slow next to its peers (plan/straggler.py)
# InferenceService condition types.
READY = "Ready"
MODEL_LOADED = "ModelLoaded"
PROGRESSING = "Progressing"
SCALING_ACTIVE = "ScalingActive"


def timestamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def find(conditions: Sequence[Condition], kind: str) -> Condition | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def is_true(conditions: Sequence[Condition], kind: str) -> bool:
    found = find(conditions, kind)
    return found is not None and found.get("status") == "True"


def set_condition(
    conditions: Sequence[Condition],
    kind: str,
    status: bool | str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> tuple[list[Condition], bool]:
    """Conditions with `kind` set; lastTransitionTime moves only when the status flips.

    Returns the new list and whether anything changed.
    """
    value = status if isinstance(status, str) else ("True" if status else "False")
    previous = find(conditions, kind)
    updated: Condition = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": (
            previous["lastTransitionTime"]
            if previous is not None
            and previous.get("status") == value
            and previous.get("lastTransitionTime")
            else timestamp(now)
        ),
    }
    if generation is not None:
        updated["observedGeneration"] = generation
    if previous == updated:
        return list(conditions), False
    others = [c for c in conditions if c.get("type") != kind]
    return [*others, updated], True


Event = tuple[str, str, str]  # (type, reason, message)


class _Conditioned(TypedDict, total=False):
    conditions: list[Condition]


S = TypeVar("S", bound=_Conditioned)


class StatusDraft(Generic[S]):
    """The status being built in one reconcile, with the events its condition changes announce.

    `S` is the kind's status TypedDict (`LLMTrainJobStatusFields`,
    `InferenceServiceStatusFields`), so planners fill typed fields.

    A change of a condition's (status, reason) is announced when the condition turns True,
    when it is a warning, or when its kind is in `announce` (kinds whose every move is news).
    """

    def __init__(
        self,
        current: Mapping[str, Any],
        now: datetime,
        generation: int | None,
        announce: frozenset[str] = frozenset(),
    ) -> None:
        data = copy.deepcopy(dict(current))
        data.setdefault("conditions", [])
        self.data: S = cast(S, data)
        self.now = now
        self.generation = generation
        self.announce = announce
        self.events: list[Event] = []

    @property
    def conditions(self) -> list[Condition]:
        return list(self._raw().get("conditions") or [])

    def is_true(self, kind: str) -> bool:
        return is_true(self.conditions, kind)

    def set(self, kind: str, status: bool, reason: str, message: str, warn: bool = False) -> None:
        current = self.conditions
        before = find(current, kind)
        self._raw()["conditions"], changed = set_condition(
            current, kind, status, reason, message, self.now, self.generation
        )
        value = "True" if status else "False"
        moved = before is None or (before.get("status"), before.get("reason")) != (value, reason)
        if changed and moved and (status or warn or kind in self.announce):
            self.events.append(("Warning" if warn else "Normal", reason, message))

    def _raw(self) -> dict[str, Any]:
        # Every kind's status has conditions; the TypedDict bound cannot say so to mypy.
        return cast(dict[str, Any], self.data)

    def clear(self, kind: str, reason: str, message: str) -> None:
        """Turn a True condition False (a condition that is not True stays as it is)."""
        if self.is_true(kind):
            self.set(kind, False, reason, message)


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning status `old` into `new` (removed keys become null)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


def trainjob_phase(conditions: Sequence[Condition], has_pods: bool) -> str:
    """One word for `kubectl get`: the most decisive true condition wins."""
    for kind in (FAILED, SUCCEEDED, SUSPENDED, RESTARTING, RUNNING):
        if is_true(conditions, kind):
            return kind
    if is_true(conditions, ADMITTED):
        return "Starting"
    return "Queued" if has_pods else "Pending"


def progress_status(report: Mapping[str, Any]) -> dict[str, Any]:
    """status.progress from rank 0's /progress JSON, ignoring fields of the wrong type."""

    def number(key: str) -> float | None:
        value = report.get(key)
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    step = int(number("step") or 0)
    total = int(number("totalSteps") or 0)
    progress: dict[str, Any] = {"step": step, "totalSteps": total}
    progress["percent"] = f"{step}/{total} {100 * step // total}%" if total > 0 else str(step)
    for key in ("loss", "tokensPerSecond", "mfu", "etaSeconds", "valLoss", "valPerplexity"):
        value = number(key)
        if value is not None:
            precise = key in ("loss", "mfu", "valLoss", "valPerplexity")
            progress[key] = round(value, 4) if precise else round(value, 1)
    checkpoint = number("lastCheckpointStep")
    if checkpoint is not None:
        progress["lastCheckpointStep"] = int(checkpoint)
    return progress


# Events: what the operator records on its objects, and how repeats aggregate.
EVENT_COMPONENT = "phalanx-operator"
EVENT_CONTROLLER = "phalanx.dev/operator"
EVENT_MESSAGE_LIMIT = 1024


def micro_time(now: datetime) -> str:
    """An Event's eventTime (metav1.MicroTime): RFC 3339 with microseconds."""
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_key(involved: Mapping[str, Any], kind: str, reason: str, message: str) -> tuple[str, ...]:
    """Events equal in all of these are one event seen `count` times (client-go's correlator
    aggregates by source, involved object, type, reason and message too)."""
    meta = involved.get("metadata") or {}
    return (
        str(meta.get("namespace")),
        str(meta.get("uid") or meta.get("name")),
        kind,
        reason,
        message[:EVENT_MESSAGE_LIMIT],
    )


def event_body(
    involved: Mapping[str, Any], kind: str, reason: str, message: str, now: datetime, instance: str
) -> dict[str, Any]:
    """A new core/v1 Event with every timestamp set, so `kubectl describe` and `kubectl get
    events` order and age it."""
    meta = involved["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:EVENT_MESSAGE_LIMIT],
        "source": {"component": EVENT_COMPONENT},
        "reportingComponent": EVENT_CONTROLLER,
        "reportingInstance": instance,
        # Required with eventTime: what the operator did or found, in one word.
        "action": reason,
        "firstTimestamp": timestamp(now),
        "lastTimestamp": timestamp(now),
        "eventTime": micro_time(now),
        "count": 1,
    }


def event_repeat(count: int, now: datetime) -> dict[str, Any]:
    """The merge patch of an event seen once more: its count and when it was last seen."""
    return {"count": count, "lastTimestamp": timestamp(now)}
