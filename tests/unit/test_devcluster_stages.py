from __future__ import annotations

from pathlib import Path

import yaml

from phalanx.devcluster import kwok_stages


def test_every_stage_file_is_a_kwok_stage_with_a_unique_name() -> None:
    stages = kwok_stages.load_stages()

    assert {s["kind"] for s in stages} == {"Stage"}
    names = [s["metadata"]["name"] for s in stages]
    assert len(names) == len(set(names)) == len(kwok_stages.STAGE_FILES)
    assert {s["spec"]["resourceRef"]["kind"] for s in stages} == {"Node", "Pod"}


def test_outcome_stage_reads_the_documented_annotations() -> None:
    outcome = next(
        s for s in kwok_stages.load_stages() if s["metadata"]["name"] == "phalanx-pod-outcome"
    )
    text = yaml.safe_dump(outcome)

    for annotation in (
        kwok_stages.FAKE_OUTCOME,
        kwok_stages.FAKE_EXIT_CODE,
        kwok_stages.FAKE_DURATION,
    ):
        assert annotation in text
    assert outcome["spec"]["delay"]["durationFrom"]["jq"]["expression"].endswith(
        f'["{kwok_stages.FAKE_DURATION}"]'
    )


def test_node_stages_honour_the_not_ready_annotation() -> None:
    node_stages = [
        s for s in kwok_stages.load_stages() if s["spec"]["resourceRef"]["kind"] == "Node"
    ]

    assert all(kwok_stages.FAKE_NODE_READY in yaml.safe_dump(s) for s in node_stages)


def test_config_file_starts_with_the_kwok_configuration(tmp_path: Path) -> None:
    path = kwok_stages.write_kwok_config(tmp_path / "kwok.yaml")
    documents = list(yaml.safe_load_all(path.read_text()))

    assert documents[0]["kind"] == "KwokConfiguration"
    assert len(documents) == 1 + len(kwok_stages.STAGE_FILES)


def _condition_fields(template: str) -> set[str]:
    """The fields each condition in a node statusTemplate sets."""
    fields: set[str] = set()
    in_conditions = False
    for line in template.splitlines():
        stripped = line.strip()
        if stripped.startswith("{{"):
            continue
        if not line.startswith((" ", "- ")) and stripped:
            in_conditions = stripped == "conditions:"
            continue
        if in_conditions and ":" in stripped:
            fields.add(stripped.removeprefix("- ").split(":", 1)[0])
    return fields


def test_heartbeats_refresh_only_the_heartbeat_never_a_stale_status() -> None:
    # kwok renders a delayed stage from the node as it was when the delay began: a heartbeat
    # that wrote conditions back whole could undo a NotReady set meanwhile.
    heartbeats = [
        s
        for s in kwok_stages.load_stages()
        if s["spec"]["resourceRef"]["kind"] == "Node" and "heartbeat" in s["metadata"]["name"]
    ]

    assert {s["metadata"]["name"] for s in heartbeats} == {
        "phalanx-node-heartbeat",
        "phalanx-node-not-ready-heartbeat",
    }
    for stage in heartbeats:
        fields = _condition_fields(stage["spec"]["next"]["statusTemplate"])
        assert fields == {"type", "lastHeartbeatTime"}, stage["metadata"]["name"]
