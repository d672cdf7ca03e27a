"""Hot spares: the spare policy, which nodes are spares, and admission with a reserve (ordinary
gangs keep off it, preemptible ones fill it, a recovery takes it in the domain it ran in)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from builders import GPU, cluster, gang, hosts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phalanx.placement import (
    GANG_EXCEEDS_DOMAIN,
    HOST,
    INSUFFICIENT_CAPACITY,
    CapacitySnapshot,
    Placement,
    SparePolicy,
    Spares,
    Topology,
    Unplaceable,
    admit,
    is_preemptible_pod,
    spare_nodes,
    untouched,
)
from phalanx.placement.spares import displaced, recovery_domain, reserve_of_total

GENERIC = Topology.parse("generic")
RACK1 = SparePolicy("rack", 1)


# --- the policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", None, id="unset"),
        pytest.param("none", None, id="none"),
        pytest.param("rack=0", None, id="zero-is-none"),
        pytest.param("rack=1", SparePolicy("rack", 1), id="one-per-rack"),
        pytest.param(" block=2 ", SparePolicy("block", 2), id="blank-trimmed"),
        pytest.param("cluster=8", SparePolicy("cluster", 8), id="whole-cluster"),
    ],
)
def test_policy_parse(text: str, expected: SparePolicy | None) -> None:
    assert SparePolicy.parse(text, GENERIC) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("rack", "expected level=count", id="no-count"),
        pytest.param("rack=-1", "expected level=count", id="negative"),
        pytest.param("rack=1,block=2", "expected level=count", id="two-levels"),
        pytest.param("row=1", "level 'row' is not a domain level", id="unknown-level"),
        pytest.param("host=1", "level 'host' is not a domain level", id="host-is-no-domain"),
        pytest.param("rack=5000", "above the limit of 1000", id="too-many"),
    ],
)
def test_bad_policy_is_refused_naming_the_setting(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="PHALANX_SPARES") as error:
        SparePolicy.parse(text, GENERIC)
    assert says in str(error.value)


# --- which nodes are spares -----------------------------------------------------------------


def test_each_rack_keeps_its_last_free_node_and_a_filled_one_first() -> None:
    snapshot = cluster().racks(3).hosts(3).busy("z0b0r1h2").snapshot()
    everything = frozenset(n.name for n in snapshot.nodes)
    candidates = everything - {"z0b0r1h2"}  # ordinary work there
    filled = frozenset({"z0b0r2h0"})
    assert spare_nodes(snapshot, candidates, filled, RACK1, GENERIC) == {
        "z0b0r0h2",  # the last by name
        "z0b0r1h1",  # h2 holds ordinary work
        "z0b0r2h0",  # a filler runs there already
    }


def test_a_full_rack_has_no_spare_and_two_per_rack_take_two() -> None:
    snapshot = cluster().racks(2).hosts(3).snapshot()
    everything = frozenset(n.name for n in snapshot.nodes)
    candidates = everything - set(hosts("z0b0r0", 0, 1, 2))
    assert spare_nodes(snapshot, candidates, frozenset(), SparePolicy("rack", 2), GENERIC) == {
        "z0b0r1h1",
        "z0b0r1h2",
    }


def test_untouched_nodes_are_those_with_only_daemons_on_them() -> None:
    baseline = cluster().racks(1).hosts(3).snapshot()
    reclaimable = cluster().racks(1).hosts(3).busy("z0b0r0h1", gpus=1).snapshot()
    assert untouched(baseline, reclaimable) == {"z0b0r0h0", "z0b0r0h2"}


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        pytest.param({"metadata": {"labels": {"phalanx.dev/preemptible": "true"}}}, True, id="label"),
        pytest.param({"metadata": {"labels": {"phalanx.dev/preemptible": "yes"}}}, False, id="not-true"),
        pytest.param({"metadata": {}, "spec": {"priority": -10}}, True, id="negative-priority"),
        pytest.param({"metadata": {}, "spec": {"priority": 0}}, False, id="default-priority"),
        pytest.param({"metadata": {}}, False, id="plain"),
    ],
)  # fmt: skip
def test_preemptible_pods(pod: dict[str, object], expected: bool) -> None:
    assert is_preemptible_pod(pod, "phalanx.dev/preemptible") is expected


# --- admission with a reserve ---------------------------------------------------------------


def spares_for(
    free: CapacitySnapshot,
    reclaimable: CapacitySnapshot | None = None,
    policy: SparePolicy = RACK1,
    filled: frozenset[str] = frozenset(),
    extra: frozenset[str] = frozenset(),
) -> Spares:
    reclaim = reclaimable if reclaimable is not None else free
    baseline = CapacitySnapshot(tuple(n.with_free(dict(_empty(n.name))) for n in reclaim.nodes))
    spare = spare_nodes(reclaim, untouched(baseline, reclaim), filled, policy, GENERIC)
    return Spares(policy, spare | extra, reclaim)


def _empty(_: str) -> dict[str, int]:
    return {GPU: 8, "cpu": 64_000, "pods": 110}


def test_an_ordinary_gang_never_takes_the_racks_last_node() -> None:
    snap = cluster().racks(2).hosts(4).snapshot()
    spares = spares_for(snap)
    [(_, result)] = admit(snap, [gang(3, required="rack")], GENERIC, snap, spares=spares)
    assert isinstance(result, Placement)
    assert result.nodes == hosts("z0b0r0", 0, 1, 2)
    [(_, four)] = admit(snap, [gang(4, required="rack")], GENERIC, snap, spares=spares)
    assert isinstance(four, Unplaceable)
    # Every rack of 4 keeps one spare: a 4-node rack-confined gang can never be admitted.
    assert four.permanent
    assert four.reason == GANG_EXCEEDS_DOMAIN
    assert "1 node of every rack kept spare for recovery (PHALANX_SPARES=rack=1)" in four.message


def test_without_a_policy_the_whole_rack_is_usable() -> None:
    snap = cluster().racks(2).hosts(4).snapshot()
    [(_, result)] = admit(snap, [gang(4, required="rack")], GENERIC, snap)
    assert isinstance(result, Placement)
    assert len(set(result.nodes)) == 4


def test_a_preemptible_gang_fills_the_spares() -> None:
    snap = cluster().racks(2).hosts(4).busy(*hosts("z0b0r0", 0, 1, 2), *hosts("z0b0r1", 0, 1, 2))
    free = snap.snapshot()
    spares = spares_for(free, filled=frozenset())
    ordinary, filler = (
        gang(1, key="ml/ordinary"),
        replace(gang(2, key="ml/filler"), preemptible=True),
    )
    decisions = dict(admit(free, [ordinary, filler], GENERIC, snap.total(), spares=spares))
    assert isinstance(decisions[ordinary], Unplaceable)
    assert decisions[ordinary].reason == INSUFFICIENT_CAPACITY
    assert "kept spare for recovery" in decisions[ordinary].message
    placed = decisions[filler]
    assert isinstance(placed, Placement)
    assert set(placed.nodes) == {"z0b0r0h3", "z0b0r1h3"}
    assert placed.displaced == ()


def test_a_recovery_stays_in_its_rack_and_displaces_the_filler() -> None:
    # Rack r0: the gang ran on h0..h2; h1 was lost (not in the snapshot), a filler holds h3.
    built = cluster().racks(2).hosts(4).busy("z0b0r0h3")
    free = built.snapshot().without(["z0b0r0h1"])
    reclaimable = cluster().racks(2).hosts(4).snapshot().without(["z0b0r0h1"])
    spares = spares_for(free, reclaimable, filled=frozenset({"z0b0r0h3"}))
    assert "z0b0r0h3" in spares.reserved
    recovering = replace(gang(3, key="ml/job", required="rack"), recover=("rack", "z0b0r0"))
    [(_, result)] = admit(free, [recovering], GENERIC, built.total(), spares=spares)
    assert isinstance(result, Placement)
    assert (result.level, result.domain) == ("rack", "z0b0r0")
    assert set(result.nodes) == {"z0b0r0h0", "z0b0r0h2", "z0b0r0h3"}
    assert result.displaced == ("z0b0r0h3",)


def test_a_recovery_goes_first_and_its_own_nodes_are_held_for_it() -> None:
    total = cluster().racks(1).hosts(4)
    free = total.snapshot().without(["z0b0r0h0"])
    own = frozenset(hosts("z0b0r0", 1, 2))
    spares = spares_for(free, extra=own)
    waiting = gang(1, key="ml/early", created=0.0)
    recovering = replace(gang(3, key="ml/late", created=9.0), recover=("rack", "z0b0r0"))
    decisions = admit(free, [waiting, recovering], GENERIC, total.total(), spares=spares)
    assert [request.key for request, _ in decisions] == ["ml/late", "ml/early"]
    placed = decisions[0][1]
    assert isinstance(placed, Placement)
    assert placed.domain == "z0b0r0"
    assert isinstance(decisions[1][1], Unplaceable)


def test_several_lost_nodes_are_replaced_together_from_the_domains_spares() -> None:
    # 8 of a 64-node gang's nodes are lost; 8 spares of the cluster replace them at once.
    built = cluster().blocks(2).racks(4).hosts(9)  # 72 nodes
    lost = [f"z0b{b}r{r}h0" for b in range(2) for r in range(4)]
    free = built.snapshot().without(lost)
    spares = spares_for(free, policy=SparePolicy("cluster", 8))
    recovering = replace(gang(64, key="ml/big"), recover=("cluster", "cluster"))
    [(_, result)] = admit(free, [recovering], GENERIC, built.total(), spares=spares)
    assert isinstance(result, Placement)
    assert len(set(result.nodes)) == 64
    assert not set(result.nodes) & set(lost)


@pytest.mark.parametrize(
    ("level", "domain", "policy", "expected"),
    [
        pytest.param("host", "z0b0r1h0", RACK1, ("rack", "z0b0r1"), id="one-node-gang-its-rack"),
        pytest.param("rack", "z0b0r1", RACK1, ("rack", "z0b0r1"), id="rack-gang-its-rack"),
        pytest.param("rack", "z0b0r1", SparePolicy("block", 1), ("block", "z0b0"), id="rack-gang-block-spares"),
        pytest.param("block", "z0b0", RACK1, ("block", "z0b0"), id="coarser-than-the-policy"),
        pytest.param("rack", "z0b0r1", SparePolicy("cluster", 8), ("cluster", "cluster"), id="cluster-spares"),
        pytest.param("cluster", "cluster", RACK1, ("cluster", "cluster"), id="cluster-gang"),
    ],
)  # fmt: skip
def test_recovery_domain(
    level: str, domain: str, policy: SparePolicy, expected: tuple[str, str]
) -> None:
    labels = {n.name: dict(n.labels) for n in cluster().racks(2).hosts(2).total().nodes}
    nodes = ["z0b0r1h0"]
    assert recovery_domain(level, domain, nodes, labels, policy, GENERIC) == expected


def test_displaced_names_only_nodes_without_room() -> None:
    free = cluster().racks(1).hosts(3).busy("z0b0r0h2").snapshot()
    placement = Placement("rack", "z0b0r0", hosts("z0b0r0", 0, 1, 2))
    assert displaced(placement, free, {GPU: 8}) == ("z0b0r0h2",)


def test_the_empty_clusters_reserve_is_one_per_rack() -> None:
    total = cluster().racks(3).hosts(2).total()
    assert reserve_of_total(total, RACK1, GENERIC) == {"z0b0r0h1", "z0b0r1h1", "z0b0r2h1"}


# --- properties on random clusters ----------------------------------------------------------


@st.composite
def busy_racks(draw: st.DrawFn) -> tuple[CapacitySnapshot, CapacitySnapshot, list[int]]:
    racks, per_rack = draw(st.integers(1, 4)), draw(st.integers(2, 5))
    built = cluster().racks(racks).hosts(per_rack)
    names = [n.name for n in built.total().nodes]
    used = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    built.busy(*used)
    sizes = draw(st.lists(st.integers(1, per_rack), min_size=1, max_size=6))
    return built.snapshot(), built.total(), sizes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(busy_racks(), st.integers(1, 2))
def test_ordinary_gangs_never_land_on_a_spare(
    world: tuple[CapacitySnapshot, CapacitySnapshot, list[int]], count: int
) -> None:
    free, total, sizes = world
    spares = spares_for(free, policy=SparePolicy("rack", count))
    requests = [gang(n, key=f"ml/g{i}", required="rack") for i, n in enumerate(sizes)]
    for _, result in admit(free, requests, GENERIC, total, spares=spares):
        if isinstance(result, Placement):
            assert not set(result.nodes) & spares.reserved
    # Every rack still has its spares (or all it had free) after the pass.
    placed = {
        n for _, r in admit(free, requests, GENERIC, total, spares=spares)
        if isinstance(r, Placement) for n in r.nodes
    }  # fmt: skip
    for node in spares.reserved:
        assert node not in placed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 6), st.integers(0, 5), st.data())
def test_a_recovery_stays_in_its_rack_when_the_rack_holds_it(
    per_rack: int, lost_index: int, data: st.DataObject
) -> None:
    built = cluster().racks(3).hosts(per_rack)
    rack = "z0b0r1"
    size = data.draw(st.integers(1, per_rack - 1))
    lost = f"{rack}h{lost_index % per_rack}"
    free = built.snapshot().without([lost])
    spares = spares_for(free)
    recovering = replace(gang(size, key="ml/r", required="rack"), recover=("rack", rack))
    others = [gang(1, key=f"ml/o{i}") for i in range(data.draw(st.integers(0, 4)))]
    decisions = dict(admit(free, [*others, recovering], GENERIC, built.total(), spares=spares))
    result = decisions[recovering]
    assert isinstance(result, Placement)
    assert result.recovered
    assert lost not in result.nodes
    assert all(node.startswith(rack) for node in result.nodes)


# --- a gang's own spares (failurePolicy.spares) ---------------------------------------------


def own_spares(free: CapacitySnapshot, kept: frozenset[str] = frozenset()) -> Spares:
    return Spares(None, kept, free)


def test_a_gang_is_placed_with_room_for_its_own_spares_beside_it() -> None:
    snap = cluster().racks(2).hosts(4).busy("z0b0r0h0").snapshot()
    request = replace(gang(3, key="ml/own", required="rack"), spares=1)
    later = gang(1, key="ml/later", created=1.0, required="rack")
    filler = replace(gang(1, key="ml/filler", created=2.0), preemptible=True)
    decisions = dict(admit(snap, [request, later, filler], GENERIC, snap, spares=own_spares(snap)))
    placed = decisions[request]
    assert isinstance(placed, Placement)
    # Rack r0 has only 3 free nodes: the gang and its spare go to rack r1.
    assert placed.nodes == hosts("z0b0r1", 0, 1, 2)
    assert placed.spare_nodes == ("z0b0r1h3",)
    # Ordinary gangs keep off the spare in the same pass; a preemptible one may fill it.
    assert isinstance(decisions[later], Placement)
    assert "z0b0r1h3" not in decisions[later].nodes
    assert isinstance(decisions[filler], Placement)


def test_a_gang_that_fits_its_domain_only_without_its_spares_never_fits() -> None:
    snap = cluster().racks(2).hosts(4).snapshot()
    request = replace(gang(4, required="rack"), spares=1)
    [(_, result)] = admit(snap, [request], GENERIC, snap, spares=own_spares(snap))
    assert isinstance(result, Unplaceable)
    assert result.permanent
    assert "(counting 4 pods and room for failurePolicy.spares 1 more)" in result.message


def test_the_room_kept_for_a_running_gang_is_off_limits_to_ordinary_gangs() -> None:
    snap = cluster().racks(1).hosts(2).snapshot()
    kept = frozenset({"z0b0r0h1"})
    ordinary, filler = gang(2, key="ml/two"), replace(gang(1, key="ml/f"), preemptible=True)
    decisions = dict(admit(snap, [ordinary, filler], GENERIC, snap, spares=own_spares(snap, kept)))
    assert isinstance(decisions[ordinary], Unplaceable)
    assert decisions[filler] == Placement(HOST, "z0b0r0h0", ("z0b0r0h0",))


def test_a_recovery_uses_its_own_spare_and_keeps_the_gang_first_when_room_is_short() -> None:
    # The gang ran on r0 h0..h2 with its spare on h3; h1 is lost.
    built = cluster().racks(2).hosts(4)
    free = built.snapshot().without(["z0b0r0h1"])
    kept = frozenset(hosts("z0b0r0", 0, 2, 3))
    request = replace(gang(3, key="ml/own", required="rack"), spares=1, recover=("rack", "z0b0r0"))
    [(_, result)] = admit(free, [request], GENERIC, built.total(), spares=own_spares(free, kept))
    assert isinstance(result, Placement)
    assert result.recovered
    assert set(result.nodes) == set(hosts("z0b0r0", 0, 2, 3))
    assert result.spare_nodes == ()  # no room left in the rack for a new spare
