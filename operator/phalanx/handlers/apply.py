"""Make a plan real, the same way for both kinds: children applied every pass, pods deleted
and created, the API server's refusals remembered, status written once, events only after.

Children (Services, the checkpoint claim, the rank-table ConfigMap, PodGroups) are applied
with server-side apply as field manager `phalanx`, so a child deleted or changed by hand is
put back on the next pass. An apply is skipped when the observed child already carries the
hash of what is rendered now, which keeps the API cost of a pass with nothing to change at
zero requests. Children the owner no longer renders are deleted (found by owner reference).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from phalanx import kube, observe
from phalanx.constants import Reason
from phalanx.observe import CreateRejection
from phalanx.status import set_condition, status_patch

from .state import Key, Obj, Operator, Store, WorkQueue

log = logging.getLogger("phalanx.apply")
# What the operator last applied to a child, so an unchanged child costs no request.
APPLIED_HASH = "phalanx.dev/applied-hash"
Event = tuple[str, str, str]


def with_hash(child: Obj) -> Obj:
    """The child with the hash of its rendered content in an annotation."""
    digest = hashlib.sha256(json.dumps(child, sort_keys=True).encode()).hexdigest()[:16]
    meta = dict(child["metadata"])
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_HASH: digest}
    return {**child, "metadata": meta}


def _hash_of(obj: Obj | None) -> str | None:
    if obj is None:
        return None
    return (obj.get("metadata", {}).get("annotations") or {}).get(APPLIED_HASH)


def _store_for(op: Operator, kind: str) -> Store | None:
    """The cache of a child kind the operator watches (None for kinds it cannot watch)."""
    return {
        "Service": op.cache.child_services,
        "ConfigMap": op.cache.configmaps,
        "PersistentVolumeClaim": op.cache.claims,
    }.get(kind)


def _owned_by(obj: Obj, uid: str) -> bool:
    return any(
        ref.get("uid") == uid and ref.get("controller")
        for ref in obj.get("metadata", {}).get("ownerReferences") or []
    )


async def apply_children(op: Operator, owner: Obj, children: Iterable[Obj]) -> None:
    """Apply each child whose rendered content differs from what is observed; delete the
    Services and ConfigMaps the owner controls but no longer renders."""
    meta = owner["metadata"]
    uid, namespace = str(meta["uid"]), str(meta["namespace"])
    applied = op.applied.setdefault(uid, {})
    wanted: set[tuple[str, str]] = set()
    for child in children:
        desired = with_hash(child)
        kind, name = desired["kind"], desired["metadata"]["name"]
        wanted.add((kind, name))
        store = _store_for(op, kind)
        digest = _hash_of(desired)
        observed = store.get((namespace, name)) if store is not None else None
        if (store is not None and _hash_of(observed) == digest) or (
            store is None and applied.get((kind, name)) == digest
        ):
            continue
        if op.refused_children.get((uid, kind, name)) == digest:
            continue  # the API server refused exactly this; wait for the spec to change
        try:
            answer = await asyncio.to_thread(kube.apply, desired)
        except kube.Rejected as refusal:
            op.refused_children[(uid, kind, name)] = digest or ""
            log.warning("%s/%s: %s", namespace, meta["name"], refusal)
            await asyncio.to_thread(
                kube.event, owner, "Warning", Reason.CHILD_REJECTED,
                f"The API server rejected {kind} {name}: {refusal.message}",
            )  # fmt: skip
            continue
        op.refused_children.pop((uid, kind, name), None)
        applied[(kind, name)] = digest or ""
        if answer is not None and store is not None:
            store.put(answer)
    for kind, store in (("Service", op.cache.child_services), ("ConfigMap", op.cache.configmaps)):
        for obj in list(store.values()):
            name = str(obj["metadata"]["name"])
            if (
                obj["metadata"].get("namespace") == namespace
                and _owned_by(obj, uid)
                and (kind, name) not in wanted
                and not obj["metadata"].get("deletionTimestamp")
            ):
                await asyncio.to_thread(kube.delete, "v1", kind, namespace, name)
                store.drop(obj)


async def delete_pods(
    op: Operator,
    namespace: str,
    graceful: Iterable[str],
    forced: Iterable[str] = (),
    seen: Iterable[Mapping[str, Any]] = (),
) -> None:
    """Delete pods by name, each only as the pod the decision was made about: its uid from
    `seen` (the pods the plan looked at), else from the cache now. An operator killed after
    creating a pod leaves its successor a cache that may not know the pod yet; a delete meant
    for the previous gang's pod of that name must not remove the new one."""
    meant = {observe.name(p): str(p["metadata"].get("uid") or "") for p in seen}

    def uid_of(name: str) -> str:
        cached = op.cache.pods.get((namespace, name)) or {}
        return meant.get(name) or str((cached.get("metadata") or {}).get("uid") or "")

    async def delete(name: str, force: bool) -> None:
        uid = uid_of(name)
        pod = await asyncio.to_thread(kube.delete_pod, namespace, name, force, uid or None)
        if pod is not None and pod["metadata"].get("deletionTimestamp") and not force:
            op.cache.put_pod(pod)  # terminating gracefully: it still holds its node and name
        elif (stale := op.cache.pods.get((namespace, name))) is not None and (
            not uid or stale["metadata"].get("uid") == uid
        ):
            op.cache.drop_pod(stale)  # gone at once: forget it now

    # Side by side: a 64-pod gang's restart waits for the slowest delete, not for the sum.
    await asyncio.gather(*(delete(name, False) for name in graceful))
    await asyncio.gather(*(delete(name, True) for name in forced))


async def create_pods(op: Operator, pods: list[Obj]) -> list[Obj | kube.Rejected]:
    """Create pods side by side; each answer goes into the cache, each refusal is returned."""
    results = await asyncio.gather(
        *(asyncio.to_thread(kube.create, pod) for pod in pods), return_exceptions=True
    )
    answers: list[Obj | kube.Rejected] = []
    for result in results:
        if isinstance(result, kube.Rejected):
            answers.append(result)
        elif isinstance(result, BaseException):
            raise result
        elif result is not None:
            op.cache.put_pod(result)
            answers.append(result)
    return answers


def record_rejection(
    rejections: dict[Key, CreateRejection],
    key: Key,
    answers: list[Obj | kube.Rejected],
    owner: Obj,
    now: datetime,
) -> bool:
    """Remember the API server's refusal (counting attempts); True when nothing was refused."""
    refused = [a for a in answers if isinstance(a, kube.Rejected)]
    if not refused:
        if answers:
            rejections.pop(key, None)
        return True
    first = refused[0]
    generation = owner["metadata"].get("generation")
    previous = rejections.get(key)
    attempts = previous.attempts + 1 if previous and previous.generation == generation else 1
    rejections[key] = CreateRejection(
        object=f"{first.kind} {first.name}",
        code=first.code,
        message=first.message,
        attempts=attempts,
        at=now,
        generation=generation,
    )
    log.warning("%s/%s: %s (attempt %d)", *key, first, attempts)
    return False


async def write_status(
    plural: str,
    store: Store,
    owner: Obj,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    events: Iterable[Event],
) -> bool:
    """Patch what changed in status; send the events only once that write succeeded.

    Returns False when the owner is gone.
    """
    patch = status_patch(old, new)
    if not patch:
        return True
    meta = owner["metadata"]
    updated = await asyncio.to_thread(
        kube.patch_status, plural, meta["namespace"], meta["name"], patch
    )
    if updated is None:
        return False
    store.put(updated)
    for kind, reason, message in events:
        await asyncio.to_thread(kube.event, owner, kind, reason, message)
    return True


async def report_invalid(
    plural: str,
    store: Store,
    owner: Obj,
    condition: str,
    message: str,
    now: datetime,
    extra: dict[str, Any] | None = None,
) -> None:
    """A spec the API server accepted but the operator cannot run (e.g. an older CRD):
    `condition=False, reason InvalidSpec` and one Warning event; nothing is created."""
    await report_refused(
        plural, store, owner, condition, Reason.INVALID_SPEC,
        f"The spec is invalid: {message}. Fix the spec; nothing was created.", now, extra,
        event=message,
    )  # fmt: skip


async def report_refused(
    plural: str,
    store: Store,
    owner: Obj,
    condition: str,
    reason: str,
    message: str,
    now: datetime,
    extra: dict[str, Any] | None = None,
    event: str | None = None,
) -> None:
    """A spec the operator will not run as it stands: `condition=False` with `reason`, one
    Warning event when that is new, nothing created, no requeue (the spec's or the refusing
    object's next watch event brings the next pass)."""
    status = dict(owner.get("status") or {})
    generation = owner["metadata"].get("generation")
    conditions, changed = set_condition(
        status.get("conditions") or [], condition, False, reason, message, now, generation
    )
    new = {**status, "conditions": conditions, "observedGeneration": generation, **(extra or {})}
    if not changed and status_patch(status, new) == {}:
        return
    await write_status(plural, store, owner, status, new, [("Warning", reason, event or message)])


def requeue(queue: WorkQueue, key: Key, after: float | None) -> None:
    if after is not None:
        queue.add_after(key, after)
