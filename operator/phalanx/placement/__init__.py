"""Gang placement: a capacity snapshot and gang requests in, node assignments or reasons out.

Everything here is a pure function of plain data (no clock, no client, no I/O), so the admission
loop in ``phalanx.handlers`` can call it on every change and tests can call it on tables.
"""

from __future__ import annotations

from phalanx.placement.filters import PodConstraints
from phalanx.placement.gang import (
    GANG_EXCEEDS_DOMAIN,
    INSUFFICIENT_CAPACITY,
    POD_EXCEEDS_NODE,
    QUEUED_BEHIND,
    UNKNOWN_LEVEL,
    GangRequest,
    Placement,
    Unplaceable,
)
from phalanx.placement.place import describe_placement, domains, place_gang
from phalanx.placement.preferred import WAITING_FOR_PREFERRED, preferred_hold, recheck_after
from phalanx.placement.queue import (
    Decision,
    admission_window,
    admit,
    queue_order,
    waiting_domain,
)
from phalanx.placement.snapshot import (
    CapacitySnapshot,
    NodeInfo,
    holding_node,
    pod_demand,
    pod_requests,
)
from phalanx.placement.spares import (
    SPARES_ENV,
    SparePolicy,
    Spares,
    is_preemptible_pod,
    recovery_domain,
    spare_nodes,
    untouched,
)
from phalanx.placement.topology import (
    CLUSTER,
    DEFAULT_TOPOLOGY,
    HOST,
    HOST_LABEL,
    PRESETS,
    Topology,
    TopologyLevel,
)

__all__ = [
    "CLUSTER",
    "DEFAULT_TOPOLOGY",
    "GANG_EXCEEDS_DOMAIN",
    "HOST",
    "HOST_LABEL",
    "INSUFFICIENT_CAPACITY",
    "POD_EXCEEDS_NODE",
    "PRESETS",
    "QUEUED_BEHIND",
    "SPARES_ENV",
    "UNKNOWN_LEVEL",
    "WAITING_FOR_PREFERRED",
    "CapacitySnapshot",
    "Decision",
    "GangRequest",
    "NodeInfo",
    "Placement",
    "PodConstraints",
    "SparePolicy",
    "Spares",
    "Topology",
    "TopologyLevel",
    "Unplaceable",
    "admission_window",
    "admit",
    "describe_placement",
    "domains",
    "holding_node",
    "is_preemptible_pod",
    "place_gang",
    "pod_demand",
    "pod_requests",
    "preferred_hold",
    "queue_order",
    "recheck_after",
    "recovery_domain",
    "spare_nodes",
    "untouched",
    "waiting_domain",
]
