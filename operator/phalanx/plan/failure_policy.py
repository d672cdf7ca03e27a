"""What a rank's end means for its gang: why it can no longer finish (its container's own
classified end, a lost node, a deleted pod, an image that can never be pulled) and which
action failurePolicy.rules, then the built-in defaults, take. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from phalanx import observe
from phalanx.api.trainjob import FailureRule
from phalanx.constants import PERMANENT_REASONS, PERMANENT_START_REASONS, Reason
from phalanx.observe import StartProblem
from phalanx.render.trainjob import CONTAINER


@dataclass(frozen=True)
class RankFailure:
    rank: int
    pod: str
    node: str
    exit_code: int | None
    reasons: tuple[str, ...]
    message: str = ""  # the trainer's own sentence, when it followed the termination contract

    @property
    def reason(self) -> str:
        return self.reasons[0] if self.reasons else "Failed"

    def describe(self) -> str:
        if self.exit_code is not None:
            shown = [r for r in self.reasons if r not in ("Error", "Completed")][:1]
            code = f"exit code {self.exit_code}" + (f" ({shown[0]})" if shown else "")
        else:
            code = self.reason
        where = f" on node {self.node}" if self.node else ""
        said = f": {self.message!r}" if self.message else ""
        return f"rank {self.rank} (pod {self.pod}{where}) failed: {code}{said}"


def rank_failure(pod: Mapping[str, Any], ready_nodes: frozenset[str]) -> RankFailure | None:
    """Why this rank can no longer finish, or None while it still can (or already did)."""
    name = observe.name(pod)
    node = observe.node_of(pod)
    rank = observe.rank(pod)
    if observe.phase(pod) == "Succeeded":
        return None
    if observe.phase(pod) == "Failed":
        ended = observe.termination(pod, CONTAINER)
        return RankFailure(rank, name, node, ended.exit_code, ended.reasons, ended.message)
    if node and node not in ready_nodes:
        return RankFailure(rank, name, node, None, (Reason.NODE_LOST,))
    if observe.terminating(pod):
        return RankFailure(rank, name, node, None, (Reason.POD_DELETED,))
    problem = observe.start_problem(pod)
    if problem is not None and problem.reason in PERMANENT_START_REASONS:
        return RankFailure(rank, name, node, None, (problem.reason,), problem.describe())
    return None


def failure_verdict(failure: RankFailure, rules: Sequence[FailureRule]) -> tuple[str, str]:
    """(action, why): the first matching rule, else the built-in defaults (the permanent
    classes of the termination contract fail the job; everything else restarts the gang)."""
    for index, rule in enumerate(rules):
        if failure.exit_code is not None and failure.exit_code in rule.on_exit_codes:
            return (
                rule.action,
                f"failurePolicy.rules[{index}] matches exit code {failure.exit_code}",
            )
        matched = next((r for r in failure.reasons if r in rule.on_reasons), None)
        if matched is not None:
            return rule.action, f"failurePolicy.rules[{index}] matches {matched}"
    permanent = next(
        (r for r in failure.reasons if r in PERMANENT_REASONS | PERMANENT_START_REASONS), None
    )
    if permanent is not None:
        return "FailJob", f"{permanent} is permanent by default: retrying cannot help"
    return "RestartGang", "unmatched failures restart the gang"


def failure_action(failure: RankFailure, rules: Sequence[FailureRule]) -> str:
    return failure_verdict(failure, rules)[0]


def start_failure(pod: Mapping[str, Any], problem: StartProblem) -> RankFailure:
    """A rank whose container could not start by the gang timeout, as a rank failure: its
    reasons are the kubelet's waiting reason and ours (ImagePullFailed, ContainerConfigError)."""
    detail = f"image {problem.image!r}: {problem.message}" if problem.image else problem.message
    return RankFailure(
        observe.rank(pod),
        problem.pod,
        observe.node_of(pod),
        None,
        (problem.reason, problem.condition_reason),
        detail,
    )
