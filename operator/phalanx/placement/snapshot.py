"""The capacity snapshot: free resources per schedulable node, built from raw Node and Pod dicts.

Amounts are integers: cpu in millicores, memory and storage in bytes, extended resources
(``nvidia.com/gpu``) in devices, and ``pods`` in pod slots. A snapshot is a value: reserving
capacity for a gang returns a new snapshot and leaves the old one untouched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from phalanx.observe import node_ready
from phalanx.placement.topology import HOST_LABEL
from phalanx.quantity import resource_amount

PODS = "pods"

# Taints the node lifecycle controller sets on nodes nothing new should land on.
UNSCHEDULABLE_TAINTS: frozenset[str] = frozenset(
    {
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/unschedulable",
        "node.kubernetes.io/network-unavailable",
    }
)
_BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class NodeInfo:
    """A schedulable node: its labels and what is still free on it."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    free: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only views so a snapshot cannot be changed through a node it hands out.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "free", MappingProxyType(dict(self.free)))

    def __hash__(self) -> int:
        return hash(self.name)


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


@dataclass(frozen=True)
class CapacitySnapshot:
    """Free capacity of every schedulable node, ordered by node name."""

    nodes: tuple[NodeInfo, ...] = ()
    _by_name: Mapping[str, NodeInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.nodes, key=lambda node: node.name))
        by_name = {node.name: node for node in ordered}
        if len(by_name) != len(ordered):
            duplicates = sorted(
                name for name, n in Counter(n.name for n in ordered).items() if n > 1
            )
            raise ValueError(f"duplicate node names in snapshot: {', '.join(duplicates)}")
        object.__setattr__(self, "nodes", ordered)
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def node(self, name: str) -> NodeInfo:
        return self._by_name[name]

    def without(self, names: Iterable[str]) -> CapacitySnapshot:
        """The snapshot minus some nodes (unhealthy ones, or capacity held for another gang)."""
        drop = set(names)
        if not drop & self._by_name.keys():
            return self
        return CapacitySnapshot(tuple(node for node in self.nodes if node.name not in drop))

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
        nodes = []
        for node in self.nodes:
            count = counts.get(node.name, 0)
            if count:
                free = dict(node.free)
                for resource, amount in demand.items():
                    if resource == PODS and PODS not in free:
                        continue
                    free[resource] = free.get(resource, 0) - amount * count
                node = NodeInfo(node.name, node.labels, free)
            nodes.append(node)
        return CapacitySnapshot(tuple(nodes))

    @classmethod
    def from_objects(
        cls,
        nodes: Iterable[Mapping[str, Any]],
        pods: Iterable[Mapping[str, Any]] = (),
        avoid: Iterable[str] = frozenset(),
    ) -> CapacitySnapshot:
        """Build a snapshot from Node and Pod dicts as the API server returns them (camelCase).

        Keeps nodes that are Ready, not cordoned, not tainted by the node lifecycle controller and
        not in ``avoid``; subtracts the requests of every pod that is bound to a node, or reserved
        for one (ungated with a ``kubernetes.io/hostname`` node selector but not yet bound), and
        not finished. Pass no pods to get the empty cluster, the ``total`` placement compares with.
        """
        avoided = set(avoid)
        kept: dict[str, tuple[dict[str, str], dict[str, int]]] = {}
        by_hostname: dict[str, str] = {}
        for node in nodes:
            metadata = node.get("metadata") or {}
            name = metadata.get("name")
            if not name or name in avoided or not _schedulable(node):
                continue
            labels = dict(metadata.get("labels") or {})
            allocatable = (node.get("status") or {}).get("allocatable") or {}
            free = {res: resource_amount(res, qty) for res, qty in allocatable.items()}
            kept[name] = (labels, free)
            by_hostname.setdefault(labels.get(HOST_LABEL, name), name)
        for pod in pods:
            node_name = _pod_node(pod, by_hostname)
            if node_name is None or node_name not in kept:
                continue
            free = kept[node_name][1]
            for resource, amount in pod_requests(pod).items():
                free[resource] = free.get(resource, 0) - amount
        return cls(tuple(NodeInfo(name, labels, free) for name, (labels, free) in kept.items()))


def _schedulable(node: Mapping[str, Any]) -> bool:
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return False
    for taint in spec.get("taints") or ():
        if taint.get("key") in UNSCHEDULABLE_TAINTS and taint.get("effect") in _BLOCKING_EFFECTS:
            return False
    return node_ready(node)


def _pod_node(pod: Mapping[str, Any], by_hostname: Mapping[str, str]) -> str | None:
    """The node a live pod holds capacity on, or None."""
    if (pod.get("status") or {}).get("phase") in _TERMINAL_PHASES:
        return None
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    if spec.get("schedulingGates"):
        return None  # still gated: nothing reserved yet
    hostname = (spec.get("nodeSelector") or {}).get(HOST_LABEL)
    if not hostname:
        return None  # an ordinary pending pod: kube-scheduler has promised it nothing
    return by_hostname.get(str(hostname), str(hostname))


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
