from __future__ import annotations

from collections import Counter

import pytest

from phalanx.devcluster import profiles
from phalanx.devcluster.kwok_stages import KWOK_NODE_ANNOTATION


def labels_of(nodes: list[dict[str, object]], key: str) -> Counter[str]:
    return Counter(n["metadata"]["labels"][key] for n in nodes)  # type: ignore[index]


def test_default_gpu_profile_is_2_zones_2_blocks_4_racks_4_hosts() -> None:
    nodes = profiles.render_nodes(profiles.get_profile("gpu"))

    assert len(nodes) == 64
    assert labels_of(nodes, profiles.ZONE_LABEL) == {"dev-region-1a": 32, "dev-region-1b": 32}
    assert set(labels_of(nodes, profiles.BLOCK_LABEL).values()) == {16}
    assert set(labels_of(nodes, profiles.RACK_LABEL).values()) == {4}
    assert len(labels_of(nodes, profiles.RACK_LABEL)) == 16


def test_gpu_node_has_topology_labels_gpus_and_kwok_annotation() -> None:
    node = profiles.render_nodes(profiles.get_profile("gpu"))[5]

    assert node["metadata"]["name"] == "gpu-a-b0-r1-h1"
    assert node["metadata"]["annotations"][KWOK_NODE_ANNOTATION] == "fake"
    labels = node["metadata"]["labels"]
    assert labels == labels | {
        "kubernetes.io/hostname": "gpu-a-b0-r1-h1",
        "topology.kubernetes.io/region": "dev-region-1",
        "topology.kubernetes.io/zone": "dev-region-1a",
        "phalanx.dev/block": "a-b0",
        "phalanx.dev/rack": "a-b0-r1",
        "nvidia.com/gpu.clique": "a-b0-r1",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    }
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["status"]["capacity"] == node["status"]["allocatable"]


def test_ascend_profile_offers_ascend_910_devices() -> None:
    node = profiles.render_nodes(profiles.get_profile("ascend"))[0]

    assert node["status"]["allocatable"]["huawei.com/Ascend910"] == "8"
    assert node["metadata"]["labels"]["accelerator"] == "huawei-Ascend910"
    assert "nvidia.com/gpu" not in node["status"]["allocatable"]


def test_cpu_profile_has_no_accelerators() -> None:
    allocatable = profiles.render_nodes(profiles.get_profile("cpu"))[0]["status"]["allocatable"]

    assert set(allocatable) == {"cpu", "memory", "ephemeral-storage", "pods"}


@pytest.mark.parametrize("count", [0, 1, 3, 65, 1000, 1001], ids=lambda n: f"{n}-nodes")
def test_any_node_count_gives_unique_names_and_ips_over_both_zones(count: int) -> None:
    nodes = profiles.render_nodes(profiles.get_profile("gpu"), count)

    names = [n["metadata"]["name"] for n in nodes]
    ips = [n["status"]["addresses"][0]["address"] for n in nodes]
    assert len(names) == len(set(names)) == count
    assert len(set(ips)) == count
    if count >= 16:
        zones = labels_of(nodes, profiles.ZONE_LABEL)
        assert len(zones) == 2
        assert abs(zones["dev-region-1a"] - zones["dev-region-1b"]) <= count // 2


def test_racks_never_span_blocks() -> None:
    places = profiles.host_places(profiles.get_profile("gpu"), 1000)

    block_of_rack = {p.rack: p.block for p in places}
    assert all(rack.startswith(block + "-") for rack, block in block_of_rack.items())
    assert max(Counter(p.rack for p in places).values()) == 4


def test_unknown_profile_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of ascend, cpu, gpu"):
        profiles.get_profile("tpu")
