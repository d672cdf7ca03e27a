"""The operator's topology: named levels of node labels, coarsest to finest, and their presets.

A level groups nodes into domains by the value of one node label (all nodes with
``phalanx.dev/rack=r7`` form the rack ``r7``). The finest level is always ``host``
(``kubernetes.io/hostname``), where every node is its own domain. Above the coarsest configured
level sits the implicit level ``cluster``, a single domain holding every node.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from phalanx.constants import LABEL_HOSTNAME

HOST = "host"
HOST_LABEL = LABEL_HOSTNAME
# The whole cluster as one domain; reserved, so it cannot name a configured level.
CLUSTER = "cluster"

ZONE_LABEL = "topology.kubernetes.io/zone"

_LEVEL_NAME = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
# A label key: an optional DNS-subdomain prefix and a name of at most 63 characters.
_LABEL_KEY = re.compile(
    r"(?:[a-z0-9]([-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)


@dataclass(frozen=True)
class TopologyLevel:
    """One level of the topology: its name in specs (``rack``) and the node label it reads."""

    name: str
    label: str


@dataclass(frozen=True)
class Topology:
    """Topology levels ordered coarsest to finest; the last one is always ``host``."""

    levels: tuple[TopologyLevel, ...]

    def __post_init__(self) -> None:
        _validate(self.levels)

    @classmethod
    def parse(cls, spec: str) -> Topology:
        """A preset name (``generic``, ``nvidia``, ``gke``, ``eks``) or ``name=label,...`` pairs.

        ``host=kubernetes.io/hostname`` is appended when the pairs leave it out.
        """
        text = spec.strip()
        if not text:
            raise ValueError(
                "empty topology: give a preset (" + ", ".join(PRESETS) + ") "
                "or comma-separated name=label pairs, coarsest first"
            )
        if "=" not in text:
            preset = PRESETS.get(text.lower())
            if preset is None:
                raise ValueError(
                    f"unknown topology preset {text!r}: use one of {', '.join(PRESETS)} "
                    "or comma-separated name=label pairs such as "
                    "'zone=topology.kubernetes.io/zone,rack=phalanx.dev/rack'"
                )
            return preset
        levels: list[TopologyLevel] = []
        for item in text.split(","):
            name, sep, label = (part.strip() for part in item.partition("="))
            if not sep or not name or not label:
                raise ValueError(
                    f"invalid topology level {item.strip()!r} in {spec!r}: expected name=label, "
                    "e.g. rack=phalanx.dev/rack"
                )
            levels.append(TopologyLevel(name, label))
        if levels[-1].name != HOST and all(level.label != HOST_LABEL for level in levels):
            levels.append(TopologyLevel(HOST, HOST_LABEL))
        return cls(tuple(levels))

    def __str__(self) -> str:
        """The spec that ``parse`` turns back into this topology."""
        return ",".join(f"{level.name}={level.label}" for level in self.levels)

    def __iter__(self) -> Iterator[TopologyLevel]:
        return iter(self.levels)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)

    def has_level(self, name: str) -> bool:
        """Whether ``name`` is a configured level or ``cluster``."""
        return name == CLUSTER or name in self.names

    def level_index(self, name: str) -> int:
        """0 for the coarsest configured level, up to ``len(levels) - 1`` for host; -1 for cluster."""
        if name == CLUSTER:
            return -1
        for index, level in enumerate(self.levels):
            if level.name == name:
                return index
        raise ValueError(
            f"unknown topology level {name!r}: this operator knows "
            f"{', '.join((CLUSTER, *self.names))}"
        )

    def label(self, name: str) -> str:
        """The node label of a configured level."""
        return self.levels[self._configured_index(name)].label

    def is_coarser(self, a: str, b: str) -> bool:
        """Whether level ``a`` groups more nodes per domain than level ``b``."""
        return self.level_index(a) < self.level_index(b)

    def finest_first(self, coarsest: str = CLUSTER) -> tuple[str, ...]:
        """Level names from host up to ``coarsest`` inclusive (``cluster`` last by default)."""
        stop = self.level_index(coarsest)
        names = (CLUSTER, *self.names)
        return tuple(reversed(names[stop + 1 :]))

    def describe(self) -> str:
        """``zone > block > rack > host``, for logs and messages."""
        return " > ".join(self.names)

    def _configured_index(self, name: str) -> int:
        index = self.level_index(name)
        if index < 0:
            raise ValueError(f"{CLUSTER!r} is not a labelled level")
        return index


def _validate(levels: tuple[TopologyLevel, ...]) -> None:
    if not levels:
        raise ValueError("a topology needs at least the host level")
    seen_names: set[str] = set()
    seen_labels: set[str] = set()
    for level in levels:
        if level.name == CLUSTER:
            raise ValueError(f"{CLUSTER!r} is reserved for the whole cluster; rename that level")
        if not _LEVEL_NAME.fullmatch(level.name):
            raise ValueError(
                f"invalid topology level name {level.name!r}: use lowercase letters, digits "
                "and '-', starting with a letter"
            )
        if not _LABEL_KEY.fullmatch(level.label) or len(level.label.partition("/")[0]) > 253:
            raise ValueError(f"invalid label key {level.label!r} for topology level {level.name!r}")
        if level.name in seen_names:
            raise ValueError(f"topology level {level.name!r} appears twice")
        if level.label in seen_labels:
            raise ValueError(f"label {level.label!r} is used by two topology levels")
        seen_names.add(level.name)
        seen_labels.add(level.label)
    last = levels[-1]
    if last.name != HOST or last.label != HOST_LABEL:
        raise ValueError(
            f"the finest topology level must be {HOST}={HOST_LABEL}, got {last.name}={last.label}"
        )


def _preset(*pairs: tuple[str, str]) -> Topology:
    return Topology(tuple(TopologyLevel(name, label) for name, label in pairs))


PRESETS: Mapping[str, Topology] = MappingProxyType(
    {
        "generic": _preset(
            ("zone", ZONE_LABEL),
            ("block", "phalanx.dev/block"),
            ("rack", "phalanx.dev/rack"),
            (HOST, HOST_LABEL),
        ),
        # A rack (Phalanx's own label, as in generic) holding NVLink cliques (GPU Feature
        # Discovery's label on GB200/GB300 NVL systems): jobs may ask for either.
        "nvidia": _preset(
            ("zone", ZONE_LABEL),
            ("rack", "phalanx.dev/rack"),
            ("clique", "nvidia.com/gpu.clique"),
            (HOST, HOST_LABEL),
        ),
        "gke": _preset(
            ("zone", ZONE_LABEL),
            ("block", "cloud.google.com/gce-topology-block"),
            ("subblock", "cloud.google.com/gce-topology-subblock"),
            (HOST, HOST_LABEL),
        ),
        "eks": _preset(
            ("layer1", "topology.k8s.aws/network-node-layer-1"),
            ("layer2", "topology.k8s.aws/network-node-layer-2"),
            ("layer3", "topology.k8s.aws/network-node-layer-3"),
            (HOST, HOST_LABEL),
        ),
    }
)
DEFAULT_TOPOLOGY = "generic"
