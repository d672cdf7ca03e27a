"""Cluster profiles: the fake nodes a dev cluster gets, with topology labels and capacity.

Hosts are laid out zone > block > rack > host. Racks hold a fixed number of hosts and blocks
a fixed number of racks; with `--nodes N` the number of blocks grows and the blocks are
split evenly over the profile's zones, so any N keeps a realistic topology.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from phalanx.devcluster.kwok_stages import KWOK_NODE_ANNOTATION, KWOK_NODE_ANNOTATION_VALUE

REGION = "dev-region-1"
HOSTNAME_LABEL = "kubernetes.io/hostname"
ZONE_LABEL = "topology.kubernetes.io/zone"
REGION_LABEL = "topology.kubernetes.io/region"
BLOCK_LABEL = "phalanx.dev/block"
RACK_LABEL = "phalanx.dev/rack"
GPU_CLIQUE_LABEL = "nvidia.com/gpu.clique"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"


@dataclass(frozen=True)
class Profile:
    """What one kind of host looks like and how many of them a default cluster has."""

    name: str
    node_prefix: str
    zones: int
    blocks_per_zone: int
    racks_per_block: int
    hosts_per_rack: int
    allocatable: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)
    # Accelerator labels whose value is the host's rack (NVLink domain), e.g. gpu.clique.
    rack_labels: tuple[str, ...] = ()

    @property
    def default_nodes(self) -> int:
        return self.zones * self.blocks_per_zone * self.racks_per_block * self.hosts_per_rack


@dataclass(frozen=True)
class HostPlace:
    zone: str
    block: str
    rack: str
    name: str


PROFILES: dict[str, Profile] = {
    "gpu": Profile(
        name="gpu",
        node_prefix="gpu",
        zones=2,
        blocks_per_zone=2,
        racks_per_block=4,
        hosts_per_rack=4,
        allocatable={
            "cpu": "200",
            "memory": "1800Gi",
            "ephemeral-storage": "6Ti",
            "pods": "110",
            "nvidia.com/gpu": "8",
        },
        labels={
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.memory": "81559",
            INSTANCE_TYPE_LABEL: "fake-h100x8",
        },
        rack_labels=(GPU_CLIQUE_LABEL,),
    ),
    "ascend": Profile(
        name="ascend",
        node_prefix="npu",
        zones=2,
        blocks_per_zone=1,
        racks_per_block=2,
        hosts_per_rack=4,
        allocatable={
            "cpu": "184",
            "memory": "1400Gi",
            "ephemeral-storage": "3Ti",
            "pods": "110",
            "huawei.com/Ascend910": "8",
        },
        labels={
            "accelerator": "huawei-Ascend910",
            "accelerator-type": "module-910b-8",
            INSTANCE_TYPE_LABEL: "fake-ascend910x8",
        },
    ),
    "cpu": Profile(
        name="cpu",
        node_prefix="cpu",
        zones=2,
        blocks_per_zone=1,
        racks_per_block=2,
        hosts_per_rack=4,
        allocatable={"cpu": "62", "memory": "240Gi", "ephemeral-storage": "500Gi", "pods": "110"},
        labels={INSTANCE_TYPE_LABEL: "fake-cpu64"},
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {name!r}: choose one of {known}") from None


def host_places(profile: Profile, nodes: int) -> list[HostPlace]:
    """Where each of `nodes` hosts sits; names are stable for a given profile and count."""
    racks = math.ceil(nodes / profile.hosts_per_rack)
    blocks = max(1, math.ceil(racks / profile.racks_per_block))
    zones = min(profile.zones, blocks)
    places = []
    for index in range(nodes):
        rack_index = index // profile.hosts_per_rack
        block_index = rack_index // profile.racks_per_block
        zone_letter = chr(ord("a") + block_index * zones // blocks)
        block = f"{zone_letter}-b{block_index}"
        rack = f"{block}-r{rack_index % profile.racks_per_block}"
        host = index % profile.hosts_per_rack
        places.append(
            HostPlace(
                zone=f"{REGION}{zone_letter}",
                block=block,
                rack=rack,
                name=f"{profile.node_prefix}-{rack}-h{host}",
            )
        )
    return places


def render_nodes(profile: Profile, nodes: int | None = None) -> list[dict[str, Any]]:
    """Node objects (with status) for kwok to manage; created as they are."""
    count = profile.default_nodes if nodes is None else nodes
    if count < 0:
        raise ValueError("the number of nodes cannot be negative")
    return [
        render_node(profile, place, index)
        for index, place in enumerate(host_places(profile, count))
    ]


def render_node(profile: Profile, place: HostPlace, index: int) -> dict[str, Any]:
    labels = {
        "type": "kwok",
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        HOSTNAME_LABEL: place.name,
        REGION_LABEL: REGION,
        ZONE_LABEL: place.zone,
        BLOCK_LABEL: place.block,
        RACK_LABEL: place.rack,
        "phalanx.dev/profile": profile.name,
        **profile.labels,
        **{label: place.rack for label in profile.rack_labels},
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": place.name,
            "labels": labels,
            "annotations": {
                KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE,
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {},
        "status": {
            "allocatable": dict(profile.allocatable),
            "capacity": dict(profile.allocatable),
            # A distinct address per host, so pods' hostIP tells hosts apart.
            "addresses": [
                {"type": "InternalIP", "address": node_ip(index)},
                {"type": "Hostname", "address": place.name},
            ],
        },
    }


def node_ip(index: int) -> str:
    return f"127.128.{index // 250}.{index % 250 + 1}"
