"""The capacity snapshot: free resources per schedulable node, built from raw Node and Pod dicts.

Amounts are integers: cpu in millicores, memory and storage in bytes, extended resources
(``nvidia.com/gpu``) in devices, and ``pods`` in pod slots. A snapshot is a value: reserving
capacity for a gang returns a new snapshot and leaves the old one untouched.

Because it never changes, a snapshot also keeps what placement derives from its nodes, computed
on first use: the nodes of every value of a topology label, per-node free amounts and slot
counts per pod shape, and answers such as a gang's placement (`CapacitySnapshot.memo`). A
snapshot made from another (`without`, `with_reserved`) starts from its parent's per-node
columns and label indexes, recomputing only the nodes that changed.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar, cast

from phalanx.observe import node_ready
from phalanx.placement.filters import LIFECYCLE_TAINTS, NODE_NAME_FIELD, PodConstraints, Taint
from phalanx.placement.topology import HOST_LABEL
from phalanx.quantity import resource_amount

PODS = "pods"
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
# The slot count of a node no requested resource limits; capped by the gang size where used.
UNLIMITED = sys.maxsize
# Memo kinds derived node by node, which a snapshot made from another carries over (`_carry`).
_FREE, _SLOTS, _LABEL = "free-column", "slot-column", "label-index"
_POSITIONS, _RESTRICTED = "positions", "restricted"
_NODEWISE = frozenset({_FREE, _SLOTS, _LABEL, _POSITIONS, _RESTRICTED})

T = TypeVar("T")


@dataclass(frozen=True)
class NodeInfo:
    """A node placement may use: its labels, what is still free on it, and what kube-scheduler
    checks before binding to it (taints with a blocking effect, the cordon)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    free: Mapping[str, int] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    unschedulable: bool = False

    def __post_init__(self) -> None:
        # Read-only views so a snapshot cannot be changed through a node it hands out.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "free", MappingProxyType(dict(self.free)))
        object.__setattr__(self, "taints", tuple(self.taints))

    def __hash__(self) -> int:
        return hash(self.name)

    def refusal(self, constraints: PodConstraints) -> str | None:
        """Why kube-scheduler would not bind a pod with these constraints here, or None."""
        if not self.taints and not self.unschedulable and constraints == _UNCONSTRAINED:
            return None  # the common case, without building any message
        return constraints.refusal(self.name, self.labels, self.taints, self.unschedulable)

    def with_free(self, free: Mapping[str, int]) -> NodeInfo:
        return NodeInfo(self.name, self.labels, free, self.taints, self.unschedulable)


_UNCONSTRAINED = PodConstraints()


def pod_demand(per_pod: Mapping[str, int]) -> dict[str, int]:
    """What one pod takes from a node: its requests plus one of the node's ``pods`` slots."""
    demand = {resource: amount for resource, amount in per_pod.items() if amount > 0}
    demand.setdefault(PODS, 1)
    return demand


def slots_on(free: Mapping[str, int], demand: Mapping[str, int], limit: int) -> int:
    """How many pods of this shape fit in ``free``, at most ``limit``.

    A node that does not report ``pods`` is not limited by pod count; any other resource it does
    not report is zero.
    """
    slots = limit
    for resource, amount in demand.items():
        if resource == PODS and PODS not in free:
            continue
        slots = min(slots, max(free.get(resource, 0), 0) // amount)
        if slots == 0:
            return 0
    return slots


class Derived:
    """A memoized answer (`CapacitySnapshot.memo`) that can follow a reservation: ``reserved``
    gives the answer for ``child``, the same snapshot with capacity taken on the nodes at the
    positions ``touched``, or None to have it computed afresh."""

    def reserved(self, child: CapacitySnapshot, touched: Sequence[int]) -> Derived | None:
        return None


@dataclass(frozen=True)
class CapacitySnapshot:
    """Free capacity of every schedulable node, ordered by node name."""

    nodes: tuple[NodeInfo, ...] = ()
    _by_name: Mapping[str, NodeInfo] = field(init=False, repr=False, compare=False)
    # What placement derives from the nodes, by kind and key (see `memo`).
    _memo: dict[Hashable, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = tuple(self.nodes)
        names = [node.name for node in given]
        if all(map(str.__lt__, names, names[1:])):
            # Already in order with unique names, as every snapshot made from another is.
            ordered = given
        else:
            ordered = tuple(sorted(given, key=lambda node: node.name))
            names = [node.name for node in ordered]
        by_name = dict(zip(names, ordered, strict=True))
        if len(by_name) != len(ordered):
            duplicates = sorted(
                name for name, n in Counter(n.name for n in ordered).items() if n > 1
            )
            raise ValueError(f"duplicate node names in snapshot: {', '.join(duplicates)}")
        object.__setattr__(self, "nodes", ordered)
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))
        object.__setattr__(self, "_memo", {})

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def node(self, name: str) -> NodeInfo:
        return self._by_name[name]

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``, once per snapshot and ``key``: a pure function of this snapshot (and of
        what ``key`` names) gives the same answer every time it is asked."""
        try:
            return cast(T, self._memo[key])
        except KeyError:
            value = compute()
            self._memo[key] = value
            return value

    def position(self, name: str) -> int:
        """The index of node ``name`` in ``nodes``."""
        positions = self.memo(
            (_POSITIONS, None), lambda: {n.name: i for i, n in enumerate(self.nodes)}
        )
        return positions[name]

    def label_index(self, label: str) -> Mapping[str, tuple[int, ...]]:
        """Every non-empty value of the node label ``label``, with the positions (in ``nodes``)
        of the nodes carrying it, in node order."""
        return self.memo((_LABEL, label), lambda: _label_index(self.nodes, label))

    def free_column(self, resource: str) -> tuple[int, ...]:
        """The free amount of ``resource`` on every node, in node order; negative as zero."""
        return self.memo((_FREE, resource), lambda: self._free_column(resource))

    def _free_column(self, resource: str) -> tuple[int, ...]:
        # Comprehensions, not map(max, ...): these columns are what a cold pass pays per node.
        amounts = [node.free.get(resource, 0) for node in self.nodes]
        return tuple([amount if amount > 0 else 0 for amount in amounts])

    def slot_column(self, demand: Mapping[str, int]) -> tuple[int, ...]:
        """How many pods of ``demand`` (a `pod_demand`) fit on every node, in node order, with
        no limit on their number (`UNLIMITED` where no requested resource limits them)."""
        shape = tuple(sorted(demand.items()))
        return self.memo((_SLOTS, shape), lambda: self._slot_column(shape))

    def _slot_column(self, shape: tuple[tuple[str, int], ...]) -> tuple[int, ...]:
        # Column by column, as `slots_on` computes it node by node.
        slots: Sequence[int] | None = None
        for resource, amount in shape:
            column: Sequence[int]
            if resource == PODS:
                # A node that does not report pods is not limited by their number.
                frees = [node.free for node in self.nodes]
                column = [
                    (free[PODS] if free[PODS] > 0 else 0) // amount if PODS in free else UNLIMITED
                    for free in frees
                ]
            elif amount == 1:
                column = self.free_column(resource)
            else:
                column = [free // amount for free in self.free_column(resource)]
            if slots is None:
                slots = column
            else:
                slots = [s if s < c else c for s, c in zip(slots, column, strict=True)]
        return tuple(slots) if slots is not None else (UNLIMITED,) * len(self.nodes)

    def restricted(self) -> tuple[int, ...]:
        """Positions of the nodes that refuse some pods whatever they ask: tainted or cordoned."""
        return self.memo(
            (_RESTRICTED, None),
            lambda: tuple([i for i, n in enumerate(self.nodes) if n.taints or n.unschedulable]),
        )

    def without(self, names: Iterable[str]) -> CapacitySnapshot:
        """The snapshot minus some nodes (unhealthy ones, or capacity held for another gang)."""
        drop = frozenset(names)
        if drop.isdisjoint(self._by_name):
            return self
        # An admission pass asks for the same nodes again for every gang behind a held domain.
        return self.memo(("without", drop), lambda: self._without(drop))

    def _without(self, drop: frozenset[str]) -> CapacitySnapshot:
        kept = [i for i, node in enumerate(self.nodes) if node.name not in drop]
        child = CapacitySnapshot(tuple(self.nodes[i] for i in kept))
        _carry(self, child, kept, ())
        return child

    def with_reserved(
        self, assignments: Iterable[str], per_pod: Mapping[str, int]
    ) -> CapacitySnapshot:
        """A new snapshot with one pod of ``per_pod`` taken from each node named in ``assignments``.

        A node may be named several times (several pods on it); unknown names are an error
        because reserving on a node the snapshot cannot see would silently lose the reservation.
        """
        counts = Counter(assignments)
        unknown = sorted(set(counts) - self._by_name.keys())
        if unknown:
            raise KeyError(f"cannot reserve on nodes missing from the snapshot: {unknown}")
        demand = pod_demand(per_pod)
        nodes = list(self.nodes)
        touched = sorted(self.position(name) for name in counts)
        for index in touched:
            node = nodes[index]
            free = dict(node.free)
            for resource, amount in demand.items():
                if resource == PODS and PODS not in free:
                    continue
                free[resource] = free.get(resource, 0) - amount * counts[node.name]
            nodes[index] = node.with_free(free)
        child = CapacitySnapshot(tuple(nodes))
        _carry(self, child, range(len(nodes)), touched)
        return child

    @classmethod
    def from_objects(
        cls,
        nodes: Iterable[Mapping[str, Any]],
        pods: Iterable[Mapping[str, Any]] = (),
        avoid: Iterable[str] = frozenset(),
        *,
        capacity: bool = False,
    ) -> CapacitySnapshot:
        """Build a snapshot from Node and Pod dicts as the API server returns them (camelCase).

        Keeps nodes that are Ready and not in ``avoid``, with their taints and cordon for the
        filters; subtracts the requests of every pod that is bound to a node, or reserved for one
        (ungated and pinned to it but not yet bound), and not finished.

        With ``capacity`` it describes what the cluster could ever offer, the ``total`` placement
        compares with to tell "never" from "not now": every node, Ready or not, with the states
        the node lifecycle controller lifts by itself (not-ready, unreachable, cordoned) left out.
        Pass no pods with it: the empty cluster.
        """
        avoided = set(avoid)
        kept: dict[str, tuple[Mapping[str, Any], dict[str, str], dict[str, int]]] = {}
        by_hostname: dict[str, str] = {}
        for node in nodes:
            metadata = node.get("metadata") or {}
            name = metadata.get("name")
            if not name or name in avoided or not (capacity or node_ready(node)):
                continue
            labels = dict(metadata.get("labels") or {})
            allocatable = (node.get("status") or {}).get("allocatable") or {}
            free = {res: resource_amount(res, qty) for res, qty in allocatable.items()}
            kept[name] = (node, labels, free)
            by_hostname.setdefault(labels.get(HOST_LABEL, name), name)
        for pod in pods:
            node_name = _pod_node(pod, by_hostname)
            if node_name is None or node_name not in kept:
                continue
            free = kept[node_name][2]
            for resource, amount in pod_requests(pod).items():
                free[resource] = free.get(resource, 0) - amount
        return cls(
            tuple(
                _node_info(name, node, labels, free, capacity)
                for name, (node, labels, free) in kept.items()
            )
        )


def _label_index(nodes: Sequence[NodeInfo], label: str) -> dict[str, tuple[int, ...]]:
    values = [node.labels.get(label) for node in nodes]
    members: dict[str | None, list[int]] = {value: [] for value in values}
    for index, value in enumerate(values):
        members[value].append(index)
    return {value: tuple(positions) for value, positions in members.items() if value}


def _carry(
    parent: CapacitySnapshot,
    child: CapacitySnapshot,
    kept: Sequence[int],
    touched: Sequence[int],
) -> None:
    """Give ``child`` what ``parent`` has derived from its nodes, where it still holds.

    ``child.nodes[j]`` is ``parent.nodes[kept[j]]``, with new free amounts on the positions
    ``touched`` (labels, taints and the cordon unchanged). Columns and label indexes follow
    both; a `Derived` value follows a reservation (every node kept) by its own rule; other
    answers depend on every node and are computed afresh.
    """
    whole = len(kept) == len(parent.nodes)
    renumber: dict[int, int] | None = None
    derived: list[tuple[Hashable, Derived]] = []
    for key, value in list(parent._memo.items()):
        if isinstance(value, Derived):
            if whole:
                derived.append((key, value))
            continue
        if not isinstance(key, tuple) or key[0] not in _NODEWISE:
            continue
        kind, what = key
        if kind in (_POSITIONS, _RESTRICTED):
            if whole:  # same nodes in the same order, taints and cordon unchanged
                child._memo[key] = value
        elif kind == _LABEL:
            if not whole:
                if renumber is None:
                    renumber = {old: new for new, old in enumerate(kept)}
                value = _renumbered(value, renumber)
            child._memo[key] = value
        elif kind in (_FREE, _SLOTS):
            column = list(value) if whole else [value[i] for i in kept]
            for index in touched:
                free = child.nodes[index].free
                column[index] = (
                    max(free.get(what, 0), 0)
                    if kind == _FREE
                    else slots_on(free, dict(what), UNLIMITED)
                )
            child._memo[key] = tuple(column)
    # After the columns: a derived value reads the child's columns.
    for key, value in derived:
        followed = value.reserved(child, touched)
        if followed is not None:
            child._memo[key] = followed


def _renumbered(
    index: Mapping[str, tuple[int, ...]], renumber: Mapping[int, int]
) -> dict[str, tuple[int, ...]]:
    kept = {}
    for value, positions in index.items():
        members = tuple(renumber[i] for i in positions if i in renumber)
        if members:
            kept[value] = members
    return kept


def _node_info(
    name: str,
    node: Mapping[str, Any],
    labels: dict[str, str],
    free: dict[str, int],
    capacity: bool,
) -> NodeInfo:
    spec = node.get("spec") or {}
    taints = tuple(Taint.of(raw) for raw in spec.get("taints") or ())
    if capacity:
        taints = tuple(t for t in taints if t.key not in LIFECYCLE_TAINTS)
    unschedulable = bool(spec.get("unschedulable")) and not capacity
    return NodeInfo(name, labels, free, taints, unschedulable)


def holding_node(pod: Mapping[str, Any]) -> str | None:
    """The node a live pod holds capacity on (bound, or pinned and ungated), or None."""
    return _pod_node(pod, {})


def _pod_node(pod: Mapping[str, Any], by_hostname: Mapping[str, str]) -> str | None:
    """The node a live pod holds capacity on, or None."""
    if (pod.get("status") or {}).get("phase") in _TERMINAL_PHASES:
        return None
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    if spec.get("schedulingGates"):
        return None  # still gated: nothing reserved yet
    pinned = _pinned_name(spec)
    if pinned is not None:
        return pinned
    hostname = (spec.get("nodeSelector") or {}).get(HOST_LABEL)
    if not hostname:
        return None  # an ordinary pending pod: kube-scheduler has promised it nothing
    return by_hostname.get(str(hostname), str(hostname))


def _pinned_name(spec: Mapping[str, Any]) -> str | None:
    """The node an ungated pod is pinned to by a one-node `metadata.name` matchFields term."""
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms: list[Any] = required.get("nodeSelectorTerms") or []
    # The pin is added to every term (terms are ORed): pinned when all name the same node.
    names = {_term_pin(term) for term in terms}
    return names.pop() if len(names) == 1 else None


def _term_pin(term: Mapping[str, Any]) -> str | None:
    for requirement in term.get("matchFields") or ():
        values: list[Any] = requirement.get("values") or []
        if (
            requirement.get("key") == NODE_NAME_FIELD
            and requirement.get("operator") == "In"
            and len(values) == 1
        ):
            return str(values[0])
    return None


def pod_requests(pod: Mapping[str, Any]) -> dict[str, int]:
    """The resources a pod holds on its node, as kube-scheduler computes them.

    Per container a missing request defaults to its limit. Regular containers and restartable
    init containers (sidecars) run together; ordinary init containers run one at a time, each
    beside the sidecars started before it. The pod needs the larger of the two phases, plus its
    ``overhead``, plus one ``pods`` slot.
    """
    spec = pod.get("spec") or {}
    running: Counter[str] = Counter()
    for container in spec.get("containers") or ():
        running.update(_container_requests(container))
    sidecars: Counter[str] = Counter()
    init_peak: Counter[str] = Counter()
    for container in spec.get("initContainers") or ():
        requests = _container_requests(container)
        if container.get("restartPolicy") == "Always":
            sidecars.update(requests)
            phase = sidecars
        else:
            phase = sidecars + Counter(requests)
        for resource, amount in phase.items():
            init_peak[resource] = max(init_peak[resource], amount)
    running.update(sidecars)
    total = {r: max(running[r], init_peak[r]) for r in running.keys() | init_peak.keys()}
    for resource, quantity in (spec.get("overhead") or {}).items():
        total[resource] = total.get(resource, 0) + resource_amount(resource, quantity)
    total[PODS] = total.get(PODS, 0) + 1
    return {resource: amount for resource, amount in total.items() if amount}


def _container_requests(container: Mapping[str, Any]) -> dict[str, int]:
    resources = container.get("resources") or {}
    merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {resource: resource_amount(resource, quantity) for resource, quantity in merged.items()}
