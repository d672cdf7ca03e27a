"""Gang placement and admission: tables of hand-built clusters, then properties on random ones."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import pytest
from builders import GPU, LEVEL_LABELS, ClusterBuilder, cluster, gang, hosts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phalanx.placement import (
    CLUSTER,
    GANG_EXCEEDS_DOMAIN,
    HOST,
    INSUFFICIENT_CAPACITY,
    POD_EXCEEDS_NODE,
    QUEUED_BEHIND,
    UNKNOWN_LEVEL,
    CapacitySnapshot,
    GangRequest,
    NodeInfo,
    Placement,
    Topology,
    Unplaceable,
    admission_window,
    admit,
    describe_placement,
    place_gang,
    recheck_after,
)

GENERIC = Topology.parse("generic")
NVIDIA = Topology.parse("nvidia")


# --- placement tables -----------------------------------------------------------------------

PLACEMENTS = [
    pytest.param(
        cluster().racks(2).hosts(2),
        gang(1),
        Placement(HOST, "z0b0r0h0", ("z0b0r0h0",)),
        id="one-pod-on-one-host",
    ),
    pytest.param(
        cluster().racks(2).hosts(2),
        gang(4, gpus=2),
        Placement(HOST, "z0b0r0h0", ("z0b0r0h0",) * 4),
        id="small-pods-share-a-host",
    ),
    pytest.param(
        cluster().racks(2).hosts(2).busy("z0b0r0h0", gpus=4),
        gang(2, gpus=4),
        Placement(HOST, "z0b0r0h1", ("z0b0r0h1",) * 2),
        id="half-full-host-is-too-small-for-two",
    ),
    pytest.param(
        cluster().racks(2).hosts(2).busy("z0b0r0h0", gpus=6),
        gang(1, gpus=2),
        Placement(HOST, "z0b0r0h0", ("z0b0r0h0",)),
        id="host-best-fit-fills-the-fullest-host",
    ),
    pytest.param(
        cluster().racks(2).hosts(4),
        gang(2),
        Placement("rack", "z0b0r0", hosts("z0b0r0", 0, 1)),
        id="two-full-hosts-in-one-rack",
    ),
    pytest.param(
        cluster().racks(2).hosts(4).busy(*hosts("z0b0r1", 0, 1)),
        gang(2),
        Placement("rack", "z0b0r1", hosts("z0b0r1", 2, 3)),
        id="rack-best-fit-prefers-the-fuller-rack",
    ),
    pytest.param(
        cluster().racks(2).hosts(4).busy("z0b0r0h1"),
        gang(4),
        Placement("rack", "z0b0r1", hosts("z0b0r1", 0, 1, 2, 3)),
        id="rack-with-a-busy-host-is-skipped",
    ),
    pytest.param(
        cluster().racks(2).hosts(2),
        gang(3),
        Placement("block", "z0b0", ("z0b0r0h0", "z0b0r0h1", "z0b0r1h0")),
        id="spill-into-the-block-fills-a-rack-first",
    ),
    pytest.param(
        cluster().racks(3).hosts(4).busy(*hosts("z0b0r0", 0, 1, 2), *hosts("z0b0r1", 0)),
        gang(5),
        Placement(
            "block",
            "z0b0",
            ("z0b0r0h3", *hosts("z0b0r2", 0, 1, 2, 3)),
        ),
        id="block-uses-fewest-racks-and-tightest-remainder",
    ),
    pytest.param(
        cluster().blocks(2).racks(1).hosts(2),
        gang(3),
        Placement("zone", "z0", ("z0b0r0h0", "z0b0r0h1", "z0b1r0h0")),
        id="spill-into-the-zone",
    ),
    pytest.param(
        cluster().zones(2).hosts(2),
        gang(3),
        Placement(CLUSTER, CLUSTER, ("z0b0r0h0", "z0b0r0h1", "z1b0r0h0")),
        id="spill-across-zones",
    ),
    pytest.param(
        cluster().racks(2).hosts(2).gpus(8).pods(2),
        gang(4, gpus=1),
        Placement("rack", "z0b0r0", ("z0b0r0h0",) * 2 + ("z0b0r0h1",) * 2),
        id="pod-count-limits-packing",
    ),
    pytest.param(
        cluster().racks(2).hosts(2),
        gang(2, avoid=("z0b0r0h1",)),
        Placement("rack", "z0b0r1", hosts("z0b0r1", 0, 1)),
        id="avoided-nodes-are-not-used",
    ),
    pytest.param(
        cluster().racks(2).hosts(2).without_label("rack", "z0b0r0h0"),
        gang(2),
        Placement("rack", "z0b0r1", hosts("z0b0r1", 0, 1)),
        id="node-without-rack-label-is-in-no-rack",
    ),
    pytest.param(
        cluster().racks(2).hosts(2),
        gang(2, preferred="zone"),
        Placement("rack", "z0b0r0", hosts("z0b0r0", 0, 1)),
        id="preferred-does-not-loosen-the-search",
    ),
    pytest.param(
        cluster().racks(2).hosts(2),
        gang(3, required="block"),
        Placement("block", "z0b0", ("z0b0r0h0", "z0b0r0h1", "z0b0r1h0")),
        id="required-level-itself-is-allowed",
    ),
    pytest.param(
        cluster().racks(2).hosts(2),
        gang(2, gpus=0),
        Placement(HOST, "z0b0r0h0", ("z0b0r0h0",) * 2),
        id="no-gpus-packs-by-pod-count",
    ),
]


@pytest.mark.parametrize(("builder", "request_", "expected"), PLACEMENTS)
def test_place_gang(builder: ClusterBuilder, request_: GangRequest, expected: Placement) -> None:
    result = place_gang(builder.snapshot(), request_, GENERIC, total=builder.total())
    assert result == expected


UNPLACEABLE = [
    pytest.param(
        cluster().racks(2).hosts(4),
        gang(5, required="rack"),
        Unplaceable(
            GANG_EXCEEDS_DOMAIN,
            "needs 5 pods of 8 nvidia.com/gpu inside one rack, but the largest rack holds only "
            "4 such pods even when empty; ask for fewer pods or relax spec.topology.required",
            permanent=True,
        ),
        id="bigger-than-any-rack",
    ),
    pytest.param(
        cluster().racks(2).hosts(2),
        gang(5),
        Unplaceable(
            GANG_EXCEEDS_DOMAIN,
            "needs 5 pods of 8 nvidia.com/gpu, but the whole cluster holds only 4 such pods "
            "even when empty; ask for fewer pods or add nodes",
            permanent=True,
        ),
        id="bigger-than-the-cluster",
    ),
    pytest.param(
        cluster().hosts(2),
        gang(2, gpus=16),
        Unplaceable(
            POD_EXCEEDS_NODE,
            "needs 2 pods of 16 nvidia.com/gpu; one pod asks for 16 nvidia.com/gpu "
            "(largest node: 8); lower the per-pod request",
            permanent=True,
        ),
        id="pod-bigger-than-any-node",
    ),
    pytest.param(
        cluster().hosts(2),
        gang(2, gpus=8, cpu=65_000),
        Unplaceable(
            POD_EXCEEDS_NODE,
            "needs 2 pods of 8 nvidia.com/gpu + 65 cpu; one pod asks for 65 cpu "
            "(largest node: 64); lower the per-pod request",
            permanent=True,
        ),
        id="cpu-bigger-than-any-node",
    ),
    pytest.param(
        cluster().hosts(2),
        gang(2, gpus=2, required="host"),
        Placement(HOST, "z0b0r0h0", ("z0b0r0h0",) * 2),
        id="required-host-fits-when-pods-share",
    ),
    pytest.param(
        cluster().hosts(2),
        gang(2, required="host"),
        Unplaceable(
            GANG_EXCEEDS_DOMAIN,
            "needs 2 pods of 8 nvidia.com/gpu inside one host, but the largest host holds only "
            "1 such pods even when empty; ask for fewer pods or relax spec.topology.required",
            permanent=True,
        ),
        id="required-host-too-small",
    ),
    pytest.param(
        cluster()
        .racks(3)
        .hosts(4)
        .busy(*hosts("z0b0r0", 0, 1, 2, 3), *hosts("z0b0r1", 0, 1, 2, 3))
        .busy("z0b0r2h0"),
        gang(4, required="rack"),
        Unplaceable(
            INSUFFICIENT_CAPACITY,
            "needs 4 pods of 8 nvidia.com/gpu inside one rack; the largest rack has 3 free slots "
            "(full racks: z0b0r0, z0b0r1)",
            permanent=False,
        ),
        id="racks-busy-now",
    ),
    pytest.param(
        cluster().racks(2).hosts(2).busy("z0b0r0h0", "z0b0r1h1"),
        gang(3),
        Unplaceable(
            INSUFFICIENT_CAPACITY,
            "needs 3 pods of 8 nvidia.com/gpu; the cluster has 2 free slots on 2 nodes",
            permanent=False,
        ),
        id="cluster-busy-now",
    ),
    pytest.param(
        cluster().racks(1).hosts(2),
        gang(2, avoid=("z0b0r0h0",)),
        Unplaceable(
            INSUFFICIENT_CAPACITY,
            "needs 2 pods of 8 nvidia.com/gpu; the cluster has 1 free slot on 1 node; "
            "1 node avoided after failures",
            permanent=False,
        ),
        id="avoided-nodes-never-make-it-permanent",
    ),
    pytest.param(
        cluster().hosts(2),
        gang(2, required="row"),
        Unplaceable(
            UNKNOWN_LEVEL,
            "spec.topology.required is 'row', but the operator's topology has only "
            "zone, block, rack, host, cluster",
            permanent=True,
        ),
        id="unknown-required-level",
    ),
    pytest.param(
        cluster().hosts(2),
        gang(2, preferred="clique"),
        Unplaceable(
            UNKNOWN_LEVEL,
            "spec.topology.preferred is 'clique', but the operator's topology has only "
            "zone, block, rack, host, cluster",
            permanent=True,
        ),
        id="unknown-preferred-level",
    ),
]


@pytest.mark.parametrize(("builder", "request_", "expected"), UNPLACEABLE)
def test_place_gang_unplaceable(
    builder: ClusterBuilder, request_: GangRequest, expected: Placement | Unplaceable
) -> None:
    assert place_gang(builder.snapshot(), request_, GENERIC, total=builder.total()) == expected


def test_without_total_a_shortage_is_never_permanent() -> None:
    builder = cluster().racks(2).hosts(4)
    result = place_gang(builder.snapshot(), gang(5, required="rack"), GENERIC)
    assert result == Unplaceable(
        INSUFFICIENT_CAPACITY,
        "needs 5 pods of 8 nvidia.com/gpu inside one rack; the largest rack has 4 free slots",
        permanent=False,
    )


def test_many_full_domains_are_summarised() -> None:
    builder = cluster().racks(8).hosts(1)
    builder.busy(*(f"z0b0r{r}h0" for r in range(7)))
    result = place_gang(builder.snapshot(), gang(2, required="rack"), GENERIC)
    assert isinstance(result, Unplaceable)
    assert result.message.endswith(
        "(full racks: z0b0r0, z0b0r1, z0b0r2, z0b0r3, z0b0r4 and 2 more)"
    )


def test_other_topologies_use_their_labels() -> None:
    cliques = {"a": 2, "b": 4}
    nodes = [
        NodeInfo(
            f"{clique}-{i}",
            {
                "nvidia.com/gpu.clique": f"clique-{clique}",
                "kubernetes.io/hostname": f"{clique}-{i}",
            },
            {GPU: 4},
        )
        for clique, count in cliques.items()
        for i in range(count)
    ]
    result = place_gang(CapacitySnapshot(tuple(nodes)), gang(3, gpus=4), NVIDIA)
    assert result == Placement("clique", "clique-b", ("b-0", "b-1", "b-2"))


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        pytest.param(
            gang(2, preferred="rack"),
            "placed 2 pods on 2 nodes in rack z0b0r0, within the preferred rack",
            id="preferred-met",
        ),
        pytest.param(
            gang(3, preferred="rack"),
            "placed 3 pods on 3 nodes in block z0b0; no single rack had 3 free slots, "
            "so the gang spans one block instead",
            id="preferred-missed",
        ),
        pytest.param(
            gang(8, gpus=1),
            "placed 8 pods on 1 node in host z0b0r0h0",
            id="no-preference",
        ),
    ],
)
def test_describe_placement(request_: GangRequest, expected: str) -> None:
    builder = cluster().racks(2).hosts(2)
    placement = place_gang(builder.snapshot(), request_, GENERIC)
    assert isinstance(placement, Placement)
    assert describe_placement(placement, request_, GENERIC) == expected


def test_placement_does_not_depend_on_node_order() -> None:
    builder = cluster().zones(2).blocks(2).racks(2).hosts(3).busy("z0b1r0h2", "z1b0r1h0")
    snapshot = builder.snapshot()
    shuffled = list(snapshot.nodes)
    random.Random(7).shuffle(shuffled)
    request = gang(7)
    assert place_gang(CapacitySnapshot(tuple(shuffled)), request, GENERIC) == place_gang(
        snapshot, request, GENERIC
    )


def test_a_64_pod_gang_on_1000_half_busy_nodes() -> None:
    builder = cluster().zones(2).blocks(5).racks(10).hosts(10)
    builder.busy(
        *(
            f"z{z}b{b}r{r}h{h}"
            for z in range(2)
            for b in range(5)
            for r in range(10)
            for h in range(10)
            if (z + b + r + h) % 3 == 0
        ),
        gpus=4,
    )
    snapshot, total = builder.snapshot(), builder.total()
    assert len(snapshot) == 1000
    request = gang(64)
    result = place_gang(snapshot, request, GENERIC, total=total)
    assert isinstance(result, Placement)
    assert len(set(result.nodes)) == 64
    assert result.level == "block"  # 64 free hosts exist inside one block of 100 hosts


# --- admission tables -----------------------------------------------------------------------


def _decisions(
    builder: ClusterBuilder, requests: Sequence[GangRequest], *, with_total: bool = True
) -> dict[str, Placement | Unplaceable]:
    total = builder.total() if with_total else None
    return {r.key: result for r, result in admit(builder.snapshot(), requests, GENERIC, total)}


def test_admit_orders_by_priority_then_age_then_key() -> None:
    requests = [
        gang(1, key="low-old", priority=0, created=1.0),
        gang(1, key="high-new", priority=5, created=9.0),
        gang(1, key="low-new-b", priority=0, created=2.0),
        gang(1, key="low-new-a", priority=0, created=2.0),
    ]
    order = [r.key for r, _ in admit(cluster().hosts(8).snapshot(), requests, GENERIC)]
    assert order == ["high-new", "low-old", "low-new-a", "low-new-b"]


def test_admitted_gangs_reserve_capacity_for_the_next() -> None:
    decisions = _decisions(
        cluster().racks(2).hosts(2),
        [gang(2, key="a", created=1), gang(2, key="b", created=2), gang(1, key="c", created=3)],
    )
    assert decisions["a"] == Placement("rack", "z0b0r0", hosts("z0b0r0", 0, 1))
    assert decisions["b"] == Placement("rack", "z0b0r1", hosts("z0b0r1", 0, 1))
    assert isinstance(decisions["c"], Unplaceable)
    assert decisions["c"].reason == INSUFFICIENT_CAPACITY


def test_higher_priority_takes_the_only_rack() -> None:
    decisions = _decisions(
        cluster().racks(1).hosts(2),
        [gang(2, key="old", created=1), gang(2, key="urgent", priority=10, created=2)],
    )
    assert isinstance(decisions["urgent"], Placement)
    assert isinstance(decisions["old"], Unplaceable)


def test_backfill_outside_the_domain_a_blocked_gang_waits_on() -> None:
    # The head gang needs a whole rack; r0 is closest (3 of 4 free), so it is held. A small
    # gang may still start in r1, but not in the held r0.
    builder = cluster().racks(2).hosts(4).busy("z0b0r0h0").busy(*hosts("z0b0r1", 0, 1))
    decisions = _decisions(
        builder,
        [
            gang(4, key="head", required="rack", created=1),
            gang(2, key="small", created=2),
            gang(1, key="tiny", created=3),
        ],
    )
    assert decisions["head"] == Unplaceable(
        INSUFFICIENT_CAPACITY,
        "needs 4 pods of 8 nvidia.com/gpu inside one rack; the largest rack has 3 free slots",
        permanent=False,
    )
    assert decisions["small"] == Placement("rack", "z0b0r1", hosts("z0b0r1", 2, 3))
    assert decisions["tiny"] == Unplaceable(
        QUEUED_BEHIND,
        "fits now, but only on capacity held for head, ahead of it in the queue",
        permanent=False,
    )


def test_a_blocked_gang_holds_the_domain_closest_to_fitting() -> None:
    # No host has 8 GPUs free; h1 has 4, so the head waits on h1 and a 4-GPU gang behind it
    # may not take them.
    builder = cluster().hosts(3).busy("z0b0r0h0", "z0b0r0h2").busy("z0b0r0h1", gpus=4)
    decisions = _decisions(
        builder, [gang(1, key="head", created=1), gang(1, gpus=4, key="half", created=2)]
    )
    assert isinstance(decisions["head"], Unplaceable)
    assert decisions["half"] == Unplaceable(
        QUEUED_BEHIND,
        "fits now, but only on capacity held for head, ahead of it in the queue",
        permanent=False,
    )


def test_a_blocked_gang_that_does_not_hold_leaves_its_domain_to_gangs_behind() -> None:
    # As above, but nothing is known to free h0 and h2: the head's estimated start is unknown,
    # so it holds nothing and the 4-GPU gang takes h1's free half now.
    builder = cluster().hosts(3).busy("z0b0r0h0", "z0b0r0h2").busy("z0b0r0h1", gpus=4)
    head = replace(gang(1, key="head", created=1), holds=False)
    decisions = _decisions(builder, [head, gang(1, gpus=4, key="half", created=2)])
    assert isinstance(decisions["head"], Unplaceable)
    assert decisions["head"].reason == INSUFFICIENT_CAPACITY
    assert decisions["half"] == Placement(HOST, "z0b0r0h1", ("z0b0r0h1",))


def test_a_fitting_gang_behind_thousands_that_do_not_fit_is_placed_in_one_pass() -> None:
    # 4 of 8 hosts free; 5,000 five-host gangs wait, holding nothing (no known start).
    builder = cluster().racks(2).hosts(4).busy(*hosts("z0b0r0", 0, 1, 2, 3))
    blocked = [replace(gang(5, key=f"q{i:05d}", created=i), holds=False) for i in range(5000)]
    decisions = _decisions(builder, [*blocked, gang(2, key="fits", created=9999)])
    assert sum(isinstance(decisions[r.key], Unplaceable) for r in blocked) == 5000
    assert decisions["fits"] == Placement("rack", "z0b0r1", hosts("z0b0r1", 0, 1))


def test_without_total_a_blocked_unconstrained_gang_blocks_everything_behind_it() -> None:
    decisions = _decisions(
        cluster().racks(2).hosts(2).busy("z0b0r0h0"),
        [gang(4, key="big", created=1), gang(1, key="small", created=2)],
        with_total=False,
    )
    assert isinstance(decisions["big"], Unplaceable)
    assert isinstance(decisions["small"], Unplaceable)
    assert decisions["small"].reason == QUEUED_BEHIND


def test_a_permanently_unplaceable_gang_blocks_nothing() -> None:
    decisions = _decisions(
        cluster().racks(2).hosts(2),
        [gang(9, key="never", created=1), gang(1, key="small", created=2)],
    )
    assert isinstance(decisions["never"], Unplaceable)
    assert decisions["never"].permanent
    assert isinstance(decisions["small"], Placement)


def test_admit_rejects_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="repeated: a"):
        admit(cluster().snapshot(), [gang(1, key="a"), gang(1, key="a")], GENERIC)


# --- properties -----------------------------------------------------------------------------
# An independent, brute-force model of capacity: the properties below never ask the placement
# code what fits.


def _slots(node: NodeInfo, per_pod: Mapping[str, int]) -> int:
    fits = [max(node.free.get(r, 0), 0) // a for r, a in per_pod.items() if a > 0]
    if "pods" in node.free:
        fits.append(max(node.free["pods"], 0))
    return min(fits, default=10**9)


def _domain_of(node: NodeInfo, level: str) -> str | None:
    if level == CLUSTER:
        return CLUSTER
    if level == HOST:
        return node.name
    return node.labels.get(LEVEL_LABELS[level]) or None


def _domain_slots(
    snapshot: CapacitySnapshot, request: GangRequest, level: str, *, avoid: bool = True
) -> dict[str, int]:
    slots: Counter[str] = Counter()
    for node in snapshot.nodes:
        if avoid and node.name in request.avoid_nodes:
            continue
        if request.required is not None and _domain_of(node, request.required) is None:
            continue
        domain = _domain_of(node, level)
        if domain is not None:
            slots[domain] += _slots(node, request.per_pod)
    return dict(slots)


def _allowed_levels(request: GangRequest) -> list[str]:
    return list(GENERIC.finest_first(request.required or CLUSTER))


def _fits_somewhere(
    snapshot: CapacitySnapshot, request: GangRequest, *, avoid: bool = True
) -> bool:
    return any(
        slots >= request.pods
        for level in _allowed_levels(request)
        for slots in _domain_slots(snapshot, request, level, avoid=avoid).values()
    )


def _assert_contiguous(ranks: Sequence[str | None]) -> None:
    """Each value occupies one run of consecutive ranks; None (no domain) may be anywhere."""
    seen: set[str | None] = set()
    previous: object = object()
    for value in ranks:
        if value is not None and value != previous:
            assert value not in seen, f"{value} split across runs: {list(ranks)}"
            seen.add(value)
        previous = value


def _assert_valid_placement(
    snapshot: CapacitySnapshot, request: GangRequest, placement: Placement, *, tightest: bool = True
) -> None:
    assert len(placement.nodes) == request.pods  # never a partial gang
    assert not set(placement.nodes) & request.avoid_nodes
    for name, count in Counter(placement.nodes).items():
        assert count <= _slots(snapshot.node(name), request.per_pod)  # never over capacity
    members = [snapshot.node(name) for name in placement.nodes]
    assert {_domain_of(node, placement.level) for node in members} == {placement.domain}
    if request.required is not None:
        assert not GENERIC.is_coarser(placement.level, request.required)
        assert len({_domain_of(node, request.required) for node in members}) == 1
        assert None not in {_domain_of(node, request.required) for node in members}
    # Tightest: no domain at any finer level could have held the whole gang.
    for level in _allowed_levels(request):
        if level == placement.level or not tightest:
            break
        assert max(_domain_slots(snapshot, request, level).values(), default=0) < request.pods
    # Ranks contiguous per node and per sub-domain at every finer level.
    _assert_contiguous(placement.nodes)
    for level in GENERIC.names[GENERIC.level_index(placement.level) + 1 :]:
        _assert_contiguous([_domain_of(node, level) for node in members])


@dataclass(frozen=True)
class World:
    snapshot: CapacitySnapshot
    total: CapacitySnapshot


@st.composite
def worlds(draw: st.DrawFn) -> World:
    """A small labelled cluster with random usage, and some nodes missing labels."""
    shape = [draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))]
    host_count = draw(st.integers(1, 3))
    gpus = draw(st.sampled_from([4, 8]))
    pod_cap = draw(st.sampled_from([2, 110]))
    used, total = [], []
    for z in range(shape[0]):
        for b in range(shape[1]):
            for r in range(shape[2]):
                for h in range(host_count):
                    name = f"z{z}b{b}r{r}h{h}"
                    labels = {"kubernetes.io/hostname": name}
                    # Labels nest, but some nodes lack the finer ones (a zone, no rack).
                    depth = draw(st.sampled_from([3, 3, 3, 3, 2, 1, 0]))
                    path = (("zone", f"z{z}"), ("block", f"z{z}b{b}"), ("rack", f"z{z}b{b}r{r}"))
                    for level, value in path[:depth]:
                        labels[LEVEL_LABELS[level]] = value
                    empty = {GPU: gpus, "cpu": 32_000, "pods": pod_cap}
                    taken_gpus = draw(st.integers(0, gpus))
                    taken_pods = draw(st.integers(0, 1))
                    free = {
                        GPU: gpus - taken_gpus,
                        "cpu": 32_000 - 4_000 * taken_gpus,
                        "pods": pod_cap - taken_pods,
                    }
                    used.append(NodeInfo(name, labels, free))
                    total.append(NodeInfo(name, labels, empty))
    return World(CapacitySnapshot(tuple(used)), CapacitySnapshot(tuple(total)))


@st.composite
def requests(draw: st.DrawFn, nodes: Sequence[str], key: str = "default/job") -> GangRequest:
    levels = [None, CLUSTER, *GENERIC.names]
    per_pod = {GPU: draw(st.sampled_from([0, 1, 2, 4, 8]))}
    if draw(st.booleans()):
        per_pod["cpu"] = draw(st.sampled_from([1_000, 8_000, 30_000]))
    return GangRequest(
        key=key,
        pods=draw(st.integers(1, 12)),
        per_pod=per_pod,
        required=draw(st.sampled_from(levels)),
        preferred=draw(st.sampled_from(levels)),
        priority=draw(st.integers(0, 2)),
        created=draw(st.integers(0, 5)),
        avoid_nodes=frozenset(draw(st.lists(st.sampled_from(nodes), max_size=2))),
    )


PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_place_gang_properties(data: st.DataObject) -> None:
    world = data.draw(worlds())
    request = data.draw(requests([node.name for node in world.snapshot.nodes]))
    result = place_gang(world.snapshot, request, GENERIC, total=world.total)
    if isinstance(result, Placement):
        _assert_valid_placement(world.snapshot, request, result)
        return
    # All or nothing: it only refuses when no allowed domain holds the whole gang now...
    assert not _fits_somewhere(world.snapshot, request)
    # ...and calls that permanent exactly when the empty cluster could not hold it either.
    assert result.permanent == (not _fits_somewhere(world.total, request, avoid=False))


@PROPERTY_SETTINGS
@given(data=st.data())
def test_best_fit_among_domains_of_the_chosen_level(data: st.DataObject) -> None:
    world = data.draw(worlds())
    request = replace(
        data.draw(requests([node.name for node in world.snapshot.nodes])),
        per_pod={GPU: data.draw(st.sampled_from([1, 2, 4, 8]))},
    )
    result = place_gang(world.snapshot, request, GENERIC)
    if not isinstance(result, Placement):
        return
    leftover: Counter[str] = Counter()
    for node in world.snapshot.nodes:
        domain = _domain_of(node, result.level)
        if node.name not in request.avoid_nodes and domain is not None:
            leftover[domain] += max(node.free[GPU], 0)
    fitting = _domain_slots(world.snapshot, request, result.level)
    best = min(leftover[d] for d, slots in fitting.items() if slots >= request.pods)
    assert leftover[result.domain] == best


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), with_total=st.booleans())
def test_admit_properties(data: st.DataObject, with_total: bool) -> None:
    world = data.draw(worlds())
    names = [node.name for node in world.snapshot.nodes]
    count = data.draw(st.integers(1, 5))
    queue = [data.draw(requests(names, key=f"gang-{i}")) for i in range(count)]
    total = world.total if with_total else None
    decisions = admit(world.snapshot, queue, GENERIC, total)

    order = [request.key for request, _ in decisions]
    expected = sorted(queue, key=lambda r: (-r.priority, r.created, r.key))
    assert order == [request.key for request in expected]
    # The head of the queue is treated exactly as if it were alone.
    head, head_result = decisions[0]
    assert head_result == place_gang(world.snapshot, head, GENERIC, total)

    taken: dict[str, Counter[str]] = {name: Counter() for name in names}
    remaining = world.snapshot
    # Without the empty cluster, a blocked gang with no ``required`` holds every node it may use.
    held_strictly: list[frozenset[str]] = []
    for request, result in decisions:
        if isinstance(result, Placement):
            for avoided in held_strictly:
                assert set(result.nodes) <= avoided
            # Held domains may push a later gang coarser, so only the head must be tightest.
            _assert_valid_placement(remaining, request, result, tightest=False)
            remaining = remaining.with_reserved(result.nodes, request.per_pod)
            for name in result.nodes:
                taken[name].update({"pods": 1, **{r: a for r, a in request.per_pod.items() if a}})
        else:
            assert result.permanent is False or with_total or result.reason == UNKNOWN_LEVEL
            if not result.permanent and request.required in (None, CLUSTER) and not with_total:
                held_strictly.append(request.avoid_nodes)
    # Never over capacity, summed over every admitted gang.
    for node in world.snapshot.nodes:
        for resource, amount in taken[node.name].items():
            assert amount <= max(node.free.get(resource, 0), 0), (node.name, resource)


# --- the preferred-domain hold ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("busy", "wait", "now", "expected", "recheck"),
    [
        pytest.param((), 60, 10, "rack", None, id="preferred-free-placed-at-once"),
        pytest.param(
            ("z0b0r0h0", "z0b0r1h0"), 60, 10, "WaitingForPreferredDomain", 50, id="held-50s-more"
        ),
        pytest.param(("z0b0r0h0", "z0b0r1h0"), 60, 61, "block", None, id="wait-over-spreads"),
        pytest.param(("z0b0r0h0", "z0b0r1h0"), 0, 10, "block", None, id="no-wait-configured"),
    ],
)
def test_hold_for_preferred(
    busy: tuple[str, ...], wait: float, now: float, expected: str, recheck: float | None
) -> None:
    builder = cluster().racks(2).hosts(2).busy(*busy)
    request = replace(gang(2, created=0.0), preferred_wait=wait)
    decisions = admit(builder.snapshot(), [request], GENERIC, builder.total(), now)
    [(_, result)] = decisions
    got = result.level if isinstance(result, Placement) else result.reason
    assert (got, recheck_after(decisions, now)) == (expected, recheck)
    if isinstance(result, Unplaceable):
        assert "spec.topology.preferredWaitSeconds" in result.message
        assert not result.permanent


def test_a_gang_waiting_for_its_preferred_rack_leaves_other_capacity_to_gangs_behind() -> None:
    # No rack has two free hosts: the first gang would span the block, so it waits for a rack
    # instead. It must not keep the hosts it declined: the one-host gang behind it takes one.
    builder = cluster().racks(2).hosts(2).busy("z0b0r0h0", "z0b0r1h0")
    waiting = replace(gang(2, key="ns/wide", created=0.0), preferred_wait=60)
    small = gang(1, key="ns/small", created=1.0)
    decisions = dict(admit(builder.snapshot(), [waiting, small], GENERIC, builder.total(), 10.0))
    assert isinstance(decisions[waiting], Unplaceable)
    assert decisions[waiting].reason == "WaitingForPreferredDomain"
    # The wide gang holds one rack, the one closest to fitting (z0b0r0 by name); the small gang
    # fits in the other.
    assert decisions[small] == Placement(HOST, "z0b0r1h1", ("z0b0r1h1",))


def test_an_admission_window_of_zero_considers_the_whole_queue() -> None:
    requests = [gang(1, key=f"ns/j{i}", created=float(i)) for i in range(100)]
    head, behind = admission_window(requests, 0)
    assert [r.key for r in head] == [f"ns/j{i}" for i in range(100)]
    assert behind == []


def test_admission_window_takes_the_head_and_queues_the_rest_with_their_position() -> None:
    requests = [gang(1, key=f"ns/j{i}", priority=i % 2, created=float(i)) for i in range(5)]
    head, behind = admission_window(requests, 2)
    assert [r.key for r in head] == ["ns/j1", "ns/j3"]
    assert [(r.key, v.reason, v.message, v.permanent) for r, v in behind] == [
        (f"ns/j{i}", "Queued", f"Waiting in the admission queue ({n} gangs ahead at the last look).", False)
        for n, i in enumerate((0, 2, 4), start=2)
    ]  # fmt: skip
