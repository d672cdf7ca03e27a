"""The node filters of kube-scheduler's default profile, as pure functions of plain data.

A gang placed on a node kube-scheduler then refuses binds partially and times out, so
placement applies the same filters the scheduler will: NodeUnschedulable, NodeName-free
NodeSelector and required NodeAffinity (`nodeSelectorTerms`, matchExpressions and
matchFields), and TaintToleration for the NoSchedule and NoExecute effects. NodeResourcesFit
(requests, extended resources and the `pods` count) is the slot arithmetic in `snapshot`.

The semantics follow k8s.io/component-helpers/scheduling/corev1 (node affinity) and
k8s.io/api/core/v1 `Toleration.ToleratesTaint`: terms are ORed, the requirements of one term
ANDed; a term with no requirements matches no node; `NotIn` and `DoesNotExist` match a node
without the key; `Gt`/`Lt` compare integers; an empty toleration key with `Exists` tolerates
every taint, an empty effect every effect.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
# Taints the node lifecycle controller sets and lifts by itself: a node carrying only these is
# temporarily unschedulable, still capacity when judging whether a gang can ever fit.
LIFECYCLE_TAINTS: frozenset[str] = frozenset(
    {
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        UNSCHEDULABLE_TAINT,
        "node.kubernetes.io/network-unavailable",
    }
)
NODE_NAME_FIELD = "metadata.name"


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"

    def __str__(self) -> str:
        return (
            f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"
        )

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Taint:
        return cls(str(raw.get("key") or ""), str(raw.get("value") or ""), str(raw.get("effect")))


@dataclass(frozen=True)
class Toleration:
    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.key and self.key != taint.key:
            return False
        if self.operator == "Exists":
            return True
        return self.operator in ("Equal", "") and self.value == taint.value

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Toleration:
        return cls(
            str(raw.get("key") or ""),
            str(raw.get("operator") or "Equal"),
            str(raw.get("value") or ""),
            str(raw.get("effect") or ""),
        )


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions or matchFields entry."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, values: Mapping[str, str]) -> bool:
        present = self.key in values
        value = values.get(self.key, "")
        if self.operator == "In":
            return present and value in self.values
        if self.operator == "NotIn":
            return not present or value not in self.values
        if self.operator == "Exists":
            return present
        if self.operator == "DoesNotExist":
            return not present
        if self.operator in ("Gt", "Lt") and present and len(self.values) == 1:
            try:
                have, bound = int(value), int(self.values[0])
            except ValueError:
                return False
            return have > bound if self.operator == "Gt" else have < bound
        return False

    def __str__(self) -> str:
        if self.operator in ("Exists", "DoesNotExist"):
            return f"{self.key} {self.operator}"
        return f"{self.key} {self.operator} ({', '.join(self.values)})"

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Requirement:
        return cls(
            str(raw.get("key") or ""),
            str(raw.get("operator") or ""),
            tuple(str(v) for v in raw.get("values") or ()),
        )


@dataclass(frozen=True)
class SelectorTerm:
    """One nodeSelectorTerm: every expression (on labels) and field (on metadata.name) holds."""

    expressions: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        if not self.expressions and not self.fields:
            return False
        node_fields = {NODE_NAME_FIELD: name}
        return all(r.matches(labels) for r in self.expressions) and all(
            r.key == NODE_NAME_FIELD and r.matches(node_fields) for r in self.fields
        )

    def __str__(self) -> str:
        return " and ".join(str(r) for r in (*self.expressions, *self.fields)) or "(empty term)"


@dataclass(frozen=True)
class PodConstraints:
    """Where one pod may run, as kube-scheduler reads its spec."""

    node_selector: tuple[tuple[str, str], ...] = ()
    terms: tuple[SelectorTerm, ...] | None = None  # None: no required node affinity
    tolerations: tuple[Toleration, ...] = ()
    _tolerates_unschedulable: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cordon = Taint(UNSCHEDULABLE_TAINT, "", "NoSchedule")
        object.__setattr__(
            self, "_tolerates_unschedulable", any(t.tolerates(cordon) for t in self.tolerations)
        )

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodConstraints:
        """The constraints of a pod dict as the API server returns it (camelCase)."""
        spec = pod.get("spec") or {}
        selector = tuple(
            sorted((str(k), str(v)) for k, v in (spec.get("nodeSelector") or {}).items())
        )
        required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        ) or None
        terms: tuple[SelectorTerm, ...] | None = None
        if required is not None:
            terms = tuple(
                SelectorTerm(
                    tuple(Requirement.of(r) for r in term.get("matchExpressions") or ()),
                    tuple(Requirement.of(r) for r in term.get("matchFields") or ()),
                )
                for term in required.get("nodeSelectorTerms") or ()
            )
        tolerations = tuple(Toleration.of(t) for t in spec.get("tolerations") or ())
        return cls(selector, terms, tolerations)

    def refusal(
        self, name: str, labels: Mapping[str, str], taints: Sequence[Taint], unschedulable: bool
    ) -> str | None:
        """Why kube-scheduler would refuse this node for the pod (a short phrase), or None."""
        if unschedulable and not self._tolerates_unschedulable:
            return "cordoned (spec.unschedulable)"
        for key, value in self.node_selector:
            if labels.get(key) != value:
                return f"nodeSelector {key}={value} does not match"
        if self.terms is not None and not any(t.matches(name, labels) for t in self.terms):
            wanted = " or ".join(f"[{t}]" for t in self.terms) or "(no terms)"
            return f"required node affinity {wanted} does not match"
        for taint in taints:
            if taint.effect in BLOCKING_EFFECTS and not any(
                t.tolerates(taint) for t in self.tolerations
            ):
                return f"taint {taint} is not tolerated"
        return None


def summarize_refusals(refusals: Iterable[str], limit: int = 3) -> str:
    """'12 nodes: taint x:NoSchedule is not tolerated; 4 nodes: ...', most common first."""
    counted = Counter(refusals).most_common()
    parts = [f"{count} node{'s' if count != 1 else ''}: {why}" for why, count in counted[:limit]]
    if len(counted) > limit:
        parts.append(f"{sum(c for _, c in counted[limit:])} more for other reasons")
    return "; ".join(parts)
