"""Pure readers of observed objects: what a pod, node or API answer says, in domain terms.

Every planner and shell module reads pods and nodes through these, so "is this pod gated?",
"why did this container end?" and "is this node Ready?" each have one answer in one place.
Includes the reader of the trainer's classified termination message
(docs/progress-contract.md, "The termination contract").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from phalanx.constants import GANG_GATE, LABEL_GENERATION, LABEL_RANK, Reason

Obj = Mapping[str, Any]

# Waiting reasons of a container that will not start without someone changing something.
IMAGE_PULL_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"}
)
CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})
CRASH_LOOP = "CrashLoopBackOff"
# kube-scheduler's words for a pod whose volume claim cannot be used: missing, being deleted,
# or unbound with immediate binding ("pod has unbound immediate PersistentVolumeClaims").
CLAIM_MARKER = "persistentvolumeclaim"


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def name(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def labels(obj: Obj) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def int_label(obj: Obj, key: str, default: int = -1) -> int:
    try:
        return int(labels(obj)[key])
    except (KeyError, ValueError, TypeError):
        return default


def rank(pod: Obj) -> int:
    return int_label(pod, LABEL_RANK)


def generation(pod: Obj) -> int:
    return int_label(pod, LABEL_GENERATION, 0)


def terminating(obj: Obj) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def phase(pod: Obj) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def gated(pod: Obj) -> bool:
    return any(
        g.get("name") == GANG_GATE for g in (pod.get("spec") or {}).get("schedulingGates") or []
    )


def node_of(pod: Obj) -> str:
    return str((pod.get("spec") or {}).get("nodeName") or "")


def running(pod: Obj) -> bool:
    return phase(pod) == "Running" and not terminating(pod)


def pod_ready(pod: Obj) -> bool:
    """Running, not being deleted, and passing its readiness probe."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return running(pod) and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )


def created(obj: Obj) -> datetime | None:
    return parse_time(obj.get("metadata", {}).get("creationTimestamp"))


def node_ready(node: Obj) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def not_ready_for(node: Obj, now: datetime) -> float:
    """Seconds since the node's Ready condition left True (inf when unknown)."""
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            since = parse_time(condition.get("lastTransitionTime"))
            return float("inf") if since is None else (now - since).total_seconds()
    return float("inf")


def unschedulable_message(pod: Obj) -> str | None:
    """The scheduler's message for a pod it could not place, if it said so."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("message") or condition.get("reason") or "unschedulable")
    return None


# --- the termination contract --------------------------------------------------------------


@dataclass(frozen=True)
class TrainerReport:
    """The trainer's classified end, parsed from its termination message."""

    exit_code: int
    reason: str
    message: str = ""
    export_path: str | None = None
    export_steps: tuple[int, ...] | None = None
    # Rank 0's last /progress, in its final message: the poller may last have seen an earlier step.
    progress: Mapping[str, Any] | None = None


def export_path(value: Any) -> str | None:
    """A reported export path relative to the volume, or None when absent or unsafe."""
    if not isinstance(value, str) or not value.strip("/"):
        return None
    path = value.strip("/")
    # The path is joined under the model mount; it must not climb out of it.
    if any(part in ("", ".", "..") for part in path.split("/")):
        return None
    return path


def export_steps(value: Any) -> tuple[int, ...] | None:
    """Reported export steps, ascending; None when absent or not a list of integers."""
    if not isinstance(value, list):
        return None
    steps = [v for v in value if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    return tuple(sorted(set(steps)))


def trainer_report(message: Any) -> TrainerReport | None:
    """The contract's JSON from a termination message, or None when it is anything else."""
    if not isinstance(message, str) or not message.strip():
        return None
    try:
        body = json.loads(message.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None
    if not isinstance(body, dict):
        return None
    code, reason = body.get("exitCode"), body.get("reason")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(reason, str):
        return None
    if not reason:
        return None
    text = body.get("message")
    return TrainerReport(
        exit_code=code,
        reason=reason,
        message=text if isinstance(text, str) else "",
        export_path=export_path(body.get("exportPath")),
        export_steps=export_steps(body.get("exportSteps")),
        progress=body["progress"] if isinstance(body.get("progress"), dict) else None,
    )


@dataclass(frozen=True)
class Termination:
    """How a pod's main container ended, as failure rules see it.

    `exit_code` is the trainer's own when it followed the contract, else the container's;
    `reasons` holds the trainer's class first, then the kubelet's (OOMKilled) and the pod's
    (Evicted), each of which `onReasons` may match.
    """

    exit_code: int | None
    reasons: tuple[str, ...]
    message: str = ""
    report: TrainerReport | None = None

    @property
    def reason(self) -> str:
        return self.reasons[0] if self.reasons else "Failed"


def _terminated_state(pod: Obj, container: str) -> Mapping[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    ordered = [s for s in statuses if s.get("name") == container] + [
        s for s in statuses if s.get("name") != container
    ]
    for status in ordered:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return dict(terminated)
    return None


def termination(pod: Obj, container: str) -> Termination:
    """Exit code, reasons and message of `container` (else any ended container, else the pod)."""
    pod_reason = str((pod.get("status") or {}).get("reason") or "")
    terminated = _terminated_state(pod, container)
    if terminated is None:
        # Refused by the kubelet before any container ran (OutOfcpu, NodeAffinity,
        # UnexpectedAdmissionError), or evicted: the pod's own message says why.
        said = str((pod.get("status") or {}).get("message") or "")
        return Termination(None, (pod_reason or "Failed",), said)
    kubelet_reason = str(terminated.get("reason") or "Error")
    code = terminated.get("exitCode")
    report = trainer_report(terminated.get("message"))
    reasons = [kubelet_reason, pod_reason]
    if report is not None:
        reasons.insert(0, report.reason)
        code = report.exit_code
    unique = tuple(dict.fromkeys(r for r in reasons if r))
    message = report.message if report is not None else ""
    return Termination(code if isinstance(code, int) else None, unique, message, report)


@dataclass(frozen=True)
class StartProblem:
    """A container that cannot start until its spec or the cluster changes."""

    pod: str
    container: str
    image: str
    reason: str  # the kubelet's waiting reason, e.g. ImagePullBackOff
    message: str

    @property
    def condition_reason(self) -> str:
        if self.reason == Reason.CLAIM_NOT_BOUND:
            return Reason.CLAIM_NOT_BOUND
        return (
            Reason.IMAGE_PULL_FAILED
            if self.reason in IMAGE_PULL_REASONS
            else Reason.CONTAINER_CONFIG_ERROR
        )

    @property
    def remedy(self) -> str:
        if self.reason == Reason.CLAIM_NOT_BOUND:
            return (
                "Create the claim (or fix spec.checkpoint.existingClaim / the volume in "
                "spec.podTemplate), or make a volume available to bind it."
            )
        return "Fix spec.image, the pull secret or the referenced ConfigMap/Secret."

    def describe(self) -> str:
        detail = f": {self.message}" if self.message else ""
        if self.reason == Reason.CLAIM_NOT_BOUND:
            return f"pod {self.pod} cannot be scheduled, a volume claim is unusable{detail}"
        if self.reason in IMAGE_PULL_REASONS:
            return (
                f"pod {self.pod} cannot pull image {self.image!r} for container "
                f"{self.container} ({self.reason}{detail})"
            )
        return f"pod {self.pod} cannot start container {self.container} ({self.reason}{detail})"


def _container_images(pod: Obj) -> dict[str, str]:
    spec = pod.get("spec") or {}
    return {
        str(c.get("name")): str(c.get("image") or "")
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    }


def start_problem(pod: Obj) -> StartProblem | None:
    """Why an ungated `pod` cannot start until its spec or the cluster changes, if it cannot:
    a volume claim the scheduler cannot use, or the first container stuck on a bad image or a
    bad configuration."""
    status = pod.get("status") or {}
    unscheduled = unschedulable_message(pod)
    if not gated(pod) and unscheduled is not None and CLAIM_MARKER in unscheduled.lower():
        return StartProblem(name(pod), "", "", Reason.CLAIM_NOT_BOUND, unscheduled)
    images = _container_images(pod)
    for container in [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = str(waiting.get("reason") or "")
        if reason in IMAGE_PULL_REASONS or reason in CONFIG_REASONS:
            cname = str(container.get("name") or "")
            return StartProblem(
                pod=name(pod),
                container=cname,
                image=str(images.get(cname) or container.get("image") or ""),
                reason=reason,
                message=str(waiting.get("message") or ""),
            )
    return None


@dataclass(frozen=True)
class CrashLoop:
    """A container the kubelet keeps restarting, with what its last run said."""

    pod: str
    container: str
    restarts: int
    exit_code: int | None
    message: str

    def describe(self) -> str:
        last = f"last exit code {self.exit_code}" if self.exit_code is not None else "no exit code"
        said = f": {self.message.strip()[:512]!r}" if self.message.strip() else ""
        return (
            f"container {self.container} of pod {self.pod} is in CrashLoopBackOff "
            f"(restarted {self.restarts} times; {last}{said})"
        )


def crash_loop(pod: Obj) -> CrashLoop | None:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") != CRASH_LOOP:
            continue
        last = (container.get("lastState") or {}).get("terminated") or {}
        report = trainer_report(last.get("message"))
        code = last.get("exitCode")
        return CrashLoop(
            pod=name(pod),
            container=str(container.get("name") or ""),
            restarts=int(container.get("restartCount") or 0),
            exit_code=code if isinstance(code, int) else None,
            message=report.message if report is not None else str(last.get("message") or ""),
        )
    return None


# --- answers of the API server ---------------------------------------------------------------

# A rejected create is retried after 10 s, 20 s, 40 s ... at most every 5 minutes.
REJECT_BACKOFF_FIRST_SECONDS = 10.0
REJECT_BACKOFF_MAX_SECONDS = 300.0


@dataclass(frozen=True)
class CreateRejection:
    """The API server refused to create a child (4xx other than a conflict)."""

    object: str  # e.g. "Pod j-0"
    code: int
    message: str
    attempts: int
    at: datetime
    generation: int | None  # the owner's metadata.generation the rejected object came from

    def backoff(self) -> timedelta:
        seconds = REJECT_BACKOFF_FIRST_SECONDS * 2 ** max(self.attempts - 1, 0)
        return timedelta(seconds=min(seconds, REJECT_BACKOFF_MAX_SECONDS))

    def retry_at(self) -> datetime:
        return self.at + self.backoff()

    def holds(self, now: datetime, generation: int | None) -> bool:
        """Whether creating again now would only repeat the same rejection.

        A spec edit (a new generation) is a new attempt at once.
        """
        return generation == self.generation and now < self.retry_at()

    def describe(self) -> str:
        # No "retrying in Ns": a message that changed every pass would rewrite status each time.
        retry = self.retry_at().strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f"The API server rejected {self.object} (HTTP {self.code}): {self.message}. "
            f"Fix the spec (often spec.podTemplate); attempt {self.attempts}, next at {retry}."
        )
