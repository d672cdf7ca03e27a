"""Capacity snapshots of regular clusters (zones of blocks of racks of hosts) and gang
requests, for placement tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from phalanx.placement import CapacitySnapshot, GangRequest, NodeInfo, Topology

GPU = "nvidia.com/gpu"
GENERIC = Topology.parse("generic")
LEVEL_LABELS = {level.name: level.label for level in GENERIC.levels[:-1]}


@dataclass
class ClusterBuilder:
    """A regular cluster: zones of blocks of racks of hosts, named z0b1r0h2 and so on."""

    _shape: dict[str, int] = field(
        default_factory=lambda: {"zone": 1, "block": 1, "rack": 1, "host": 1}
    )
    _free: dict[str, int] = field(default_factory=lambda: {GPU: 8, "cpu": 64_000, "pods": 110})
    _used: dict[str, dict[str, int]] = field(default_factory=dict)
    _unlabelled: dict[str, set[str]] = field(default_factory=dict)

    def zones(self, n: int) -> ClusterBuilder:
        self._shape["zone"] = n
        return self

    def blocks(self, n: int) -> ClusterBuilder:
        self._shape["block"] = n
        return self

    def racks(self, n: int) -> ClusterBuilder:
        self._shape["rack"] = n
        return self

    def hosts(self, n: int) -> ClusterBuilder:
        self._shape["host"] = n
        return self

    def gpus(self, n: int) -> ClusterBuilder:
        self._free[GPU] = n
        return self

    def pods(self, n: int) -> ClusterBuilder:
        self._free["pods"] = n
        return self

    def busy(self, *nodes: str, gpus: int | None = None) -> ClusterBuilder:
        """Mark nodes as running other work: all their GPUs, or ``gpus`` of them."""
        for node in nodes:
            self._used.setdefault(node, {})[GPU] = self._free[GPU] if gpus is None else gpus
        return self

    def without_label(self, level: str, *nodes: str) -> ClusterBuilder:
        self._unlabelled.setdefault(level, set()).update(nodes)
        return self

    def _node(self, z: int, b: int, r: int, h: int, free: Mapping[str, int]) -> NodeInfo:
        name = f"z{z}b{b}r{r}h{h}"
        domains = {"zone": f"z{z}", "block": f"z{z}b{b}", "rack": f"z{z}b{b}r{r}"}
        labels = {
            LEVEL_LABELS[level]: value
            for level, value in domains.items()
            if name not in self._unlabelled.get(level, set())
        }
        labels["kubernetes.io/hostname"] = name
        return NodeInfo(name, labels, free)

    def _build(self, with_usage: bool) -> CapacitySnapshot:
        nodes = []
        s = self._shape
        for z in range(s["zone"]):
            for b in range(s["block"]):
                for r in range(s["rack"]):
                    for h in range(s["host"]):
                        name = f"z{z}b{b}r{r}h{h}"
                        free = dict(self._free)
                        if with_usage:
                            for resource, amount in self._used.get(name, {}).items():
                                free[resource] -= amount
                        nodes.append(self._node(z, b, r, h, free))
        return CapacitySnapshot(tuple(nodes))

    def snapshot(self) -> CapacitySnapshot:
        return self._build(with_usage=True)

    def total(self) -> CapacitySnapshot:
        """The same cluster with nothing running."""
        return self._build(with_usage=False)


def cluster() -> ClusterBuilder:
    return ClusterBuilder()


def gang(
    pods: int,
    gpus: int = 8,
    *,
    key: str = "default/job",
    required: str | None = None,
    preferred: str | None = None,
    priority: int = 0,
    created: float = 0.0,
    avoid: Sequence[str] = (),
    cpu: int = 0,
) -> GangRequest:
    per_pod = {GPU: gpus}
    if cpu:
        per_pod["cpu"] = cpu
    return GangRequest(
        key=key,
        pods=pods,
        per_pod=per_pod,
        required=required,
        preferred=preferred,
        priority=priority,
        created=created,
        avoid_nodes=frozenset(avoid),
    )


def hosts(prefix: str, *indices: int) -> tuple[str, ...]:
    return tuple(f"{prefix}h{i}" for i in indices)
