"""Topology levels: presets, the name=label spec, and level ordering."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.placement.topology import (
    CLUSTER,
    HOST,
    HOST_LABEL,
    PRESETS,
    Topology,
    TopologyLevel,
)


@pytest.mark.parametrize(
    ("preset", "names", "labels"),
    [
        pytest.param(
            "generic",
            ("zone", "block", "rack", "host"),
            (
                "topology.kubernetes.io/zone",
                "phalanx.dev/block",
                "phalanx.dev/rack",
                HOST_LABEL,
            ),
            id="generic",
        ),
        pytest.param(
            "nvidia",
            ("zone", "rack", "clique", "host"),
            (
                "topology.kubernetes.io/zone",
                "phalanx.dev/rack",
                "nvidia.com/gpu.clique",
                HOST_LABEL,
            ),
            id="nvidia",
        ),
        pytest.param(
            "gke",
            ("zone", "block", "subblock", "host"),
            (
                "topology.kubernetes.io/zone",
                "cloud.google.com/gce-topology-block",
                "cloud.google.com/gce-topology-subblock",
                HOST_LABEL,
            ),
            id="gke",
        ),
        pytest.param(
            "eks",
            ("layer1", "layer2", "layer3", "host"),
            (
                "topology.k8s.aws/network-node-layer-1",
                "topology.k8s.aws/network-node-layer-2",
                "topology.k8s.aws/network-node-layer-3",
                HOST_LABEL,
            ),
            id="eks",
        ),
    ],
)
def test_presets(preset: str, names: tuple[str, ...], labels: tuple[str, ...]) -> None:
    topology = Topology.parse(preset)
    assert topology.names == names
    assert tuple(level.label for level in topology) == labels
    assert topology is PRESETS[preset]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            "zone=topology.kubernetes.io/zone,rack=phalanx.dev/rack,host=kubernetes.io/hostname",
            (
                ("zone", "topology.kubernetes.io/zone"),
                ("rack", "phalanx.dev/rack"),
                (HOST, HOST_LABEL),
            ),
            id="explicit",
        ),
        pytest.param(
            "rack=phalanx.dev/rack",
            (("rack", "phalanx.dev/rack"), (HOST, HOST_LABEL)),
            id="host-appended",
        ),
        pytest.param(
            " rack = phalanx.dev/rack , host = kubernetes.io/hostname ",
            (("rack", "phalanx.dev/rack"), (HOST, HOST_LABEL)),
            id="spaces-ignored",
        ),
        pytest.param("host=kubernetes.io/hostname", ((HOST, HOST_LABEL),), id="host-only"),
        pytest.param(" GKE ", None, id="preset-case-insensitive"),
    ],
)
def test_parse(spec: str, expected: tuple[tuple[str, str], ...] | None) -> None:
    topology = Topology.parse(spec)
    if expected is None:
        assert topology == PRESETS["gke"]
    else:
        assert topology == Topology(tuple(TopologyLevel(n, label) for n, label in expected))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("", "empty topology", id="empty"),
        pytest.param("fat-tree", "unknown topology preset 'fat-tree'", id="unknown-preset"),
        pytest.param("rack", "unknown topology preset", id="bare-level-name"),
        pytest.param("rack=", "expected name=label", id="missing-label"),
        pytest.param("=phalanx.dev/rack", "expected name=label", id="missing-name"),
        pytest.param("rack=a,,host=kubernetes.io/hostname", "expected name=label", id="empty-item"),
        pytest.param("Rack=phalanx.dev/rack", "invalid topology level name 'Rack'", id="uppercase"),
        pytest.param("rack=not a label", "invalid label key", id="bad-label"),
        pytest.param("rack=a/b/c", "invalid label key", id="two-slashes"),
        pytest.param("rack=x,rack=y", "appears twice", id="duplicate-name"),
        pytest.param("rack=x,row=x", "used by two", id="duplicate-label"),
        pytest.param("cluster=x", "reserved", id="cluster-reserved"),
        pytest.param(
            "host=kubernetes.io/hostname,rack=phalanx.dev/rack",
            "finest topology level must be host",
            id="host-not-last",
        ),
        pytest.param(
            "host=phalanx.dev/node", "finest topology level must be", id="host-wrong-label"
        ),
        pytest.param(
            "node=kubernetes.io/hostname", "finest topology level must be", id="host-renamed"
        ),
    ],
)
def test_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Topology.parse(spec)


def test_level_ordering() -> None:
    topology = Topology.parse("generic")
    assert [topology.level_index(n) for n in (CLUSTER, "zone", "rack", HOST)] == [-1, 0, 2, 3]
    assert topology.is_coarser("zone", "rack")
    assert topology.is_coarser(CLUSTER, "zone")
    assert not topology.is_coarser("rack", "rack")
    assert not topology.is_coarser(HOST, "rack")
    assert topology.finest_first() == (HOST, "rack", "block", "zone", CLUSTER)
    assert topology.finest_first("block") == (HOST, "rack", "block")
    assert topology.finest_first(HOST) == (HOST,)
    assert topology.label("rack") == "phalanx.dev/rack"
    assert topology.describe() == "zone > block > rack > host"
    assert topology.has_level(CLUSTER)
    assert not topology.has_level("clique")


def test_unknown_level_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="knows cluster, zone, block, rack, host"):
        Topology.parse("generic").level_index("pod")
    with pytest.raises(ValueError, match="not a labelled level"):
        Topology.parse("generic").label(CLUSTER)


@settings(max_examples=50, deadline=None)
@given(
    names=st.lists(
        st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True).filter(
            lambda n: n not in (HOST, CLUSTER)
        ),
        max_size=4,
        unique=True,
    )
)
def test_str_round_trips(names: list[str]) -> None:
    spec = ",".join(f"{name}=example.com/{name}" for name in names)
    topology = Topology.parse(spec) if names else Topology.parse(f"{HOST}={HOST_LABEL}")
    assert Topology.parse(str(topology)) == topology
    assert topology.names[-1] == HOST
