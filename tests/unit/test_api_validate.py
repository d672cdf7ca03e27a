"""Offline validation: every example is valid, every broken manifest fails at the right field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from phalanx.api import InferenceService, InferenceServiceSpec, LLMTrainJob, LLMTrainJobSpec
from phalanx.api.crd import model_rules
from phalanx.api.validate import SpecError, parse, validate_object
from phalanx.cli import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "jobs").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "manifests" / "invalid").glob("*.yaml"))


def expected_field(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# field:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path.name} has no '# field:' header")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        assert validate_object(doc) == []


def test_there_are_enough_broken_manifests() -> None:
    assert len(INVALID) >= 15


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_broken_manifest_names_its_field(path: Path) -> None:
    errors = validate_object(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert errors, f"{path.name} was accepted"
    assert expected_field(path) in [e.path for e in errors], errors
    assert all(len(e.message) > 10 for e in errors)


def test_parse_applies_defaults() -> None:
    job = parse(
        {
            "apiVersion": "phalanx.dev/v1alpha1",
            "kind": "LLMTrainJob",
            "metadata": {"name": "x"},
            "spec": {},
        },
        LLMTrainJob,
    )
    spec = job.spec
    assert (spec.nodes, spec.accelerator.type, spec.accelerator.per_node) == (1, "nvidia", 8)
    assert spec.nproc_per_node() == 8
    assert spec.backend() == "nccl"
    assert spec.accelerator.resource_name() == "nvidia.com/gpu"
    assert spec.checkpoint.mount_path == "/checkpoints"
    assert spec.failure_policy.gang_timeout_seconds == 300


@pytest.mark.parametrize(
    ("accelerator", "backend", "nproc", "resource"),
    [
        ({"type": "cpu"}, "gloo", 1, ""),
        ({"type": "ascend"}, "hccl", 8, "huawei.com/Ascend910"),
        ({"type": "nvidia", "perNode": 4}, "nccl", 4, "nvidia.com/gpu"),
    ],
    ids=["cpu", "ascend", "nvidia-4"],
)
def test_derived_backend_and_processes(
    accelerator: dict[str, object], backend: str, nproc: int, resource: str
) -> None:
    job = LLMTrainJob.model_validate({"spec": {"accelerator": accelerator}})
    assert job.spec.backend() == backend
    assert job.spec.nproc_per_node() == nproc
    assert job.spec.accelerator.resource_name() == resource


def test_parse_raises_with_every_error() -> None:
    obj = {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "Bad_Name"},
        "spec": {"model": {}, "replicas": -1},
    }
    with pytest.raises(SpecError) as caught:
        parse(obj, InferenceService)
    paths = {e.path for e in caught.value.errors}
    assert paths == {"metadata.name", "spec.replicas"} or "spec.replicas" in paths


def test_wrong_kind_is_explained() -> None:
    errors = validate_object({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
    assert errors[0].path == "apiVersion"
    assert "phalanx.dev/v1alpha1" in errors[0].message


runner = CliRunner()


def test_cli_validate_accepts_examples() -> None:
    result = runner.invoke(app, ["validate", *map(str, EXAMPLES)])
    assert result.exit_code == 0, result.output
    assert result.output.count(" valid") == len(EXAMPLES)


def test_cli_validate_reports_field_paths_without_traceback() -> None:
    bad = INVALID[0]
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert expected_field(bad) in result.output
    assert "Traceback" not in result.output


def test_cli_validate_unreadable_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed", encoding="utf-8")
    result = runner.invoke(app, ["validate", str(broken), str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert "cannot read" in result.output
    assert "Traceback" not in result.output


def test_cli_version_and_crds_stdout() -> None:
    assert runner.invoke(app, ["version"]).output.startswith("phalanx 0.")
    out = runner.invoke(app, ["crds", "--stdout"]).output
    kinds = [d["spec"]["names"]["kind"] for d in yaml.safe_load_all(out) if d]
    assert kinds == ["LLMTrainJob", "InferenceService"]


@pytest.mark.parametrize(
    "command",
    [[], ["crds"], ["validate"], ["version"]],
    ids=["root", "crds", "validate", "version"],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


BAD_TABLE = yaml.safe_load((ROOT / "tests" / "manifests" / "bad-table.yaml").read_text())


def bad_manifest(case: dict[str, Any]) -> dict[str, Any]:
    """A case of tests/manifests/bad-table.yaml as the manifest it stands for."""
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": case.get("kind", "LLMTrainJob"),
        "metadata": {"name": case.get("name", case["id"])},
        "spec": case["spec"],
    }


def test_the_bad_table_is_large_and_distinct() -> None:
    ids = [case["id"] for case in BAD_TABLE]
    assert len(ids) >= 50
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", BAD_TABLE, ids=lambda c: c["id"])
def test_bad_table_case_names_its_field(case: dict[str, Any]) -> None:
    errors = validate_object(bad_manifest(case))
    field = case["field"]
    # A map's key is `.key` here and `[key]` from the API server: the map is the field then.
    assert any(e.path == field or e.path.startswith(field + ".") for e in errors), errors


RULE_TABLE = yaml.safe_load((ROOT / "tests" / "manifests" / "rule-table.yaml").read_text())
SPECS = {"LLMTrainJob": LLMTrainJobSpec, "InferenceService": InferenceServiceSpec}


def python_rule_verdicts(case: dict[str, Any]) -> set[str]:
    """The messages of the Rules `phalanx validate` finds broken in a rule-table case."""
    manifest = bad_manifest({**case, "field": ""})
    errors = validate_object(manifest)
    messages = {rule.message for spec in SPECS.values() for rule in model_rules(spec)}
    assert all(e.message in messages for e in errors), f"not a rule verdict: {errors}"
    return {e.message for e in errors}


def test_every_rule_fails_on_some_case_of_the_rule_table() -> None:
    failed = set().union(*(python_rule_verdicts(case) for case in RULE_TABLE))
    for kind, spec in SPECS.items():
        for rule in model_rules(spec):
            if rule.check is not None:
                assert rule.message in failed, f"{kind}: no case breaks {rule.cel!r}"


def test_zero_percent_rollout_bounds_are_zero() -> None:
    case = {"kind": "InferenceService", "id": "r", "spec": {"model": {"builtin": "tiny"}}}
    for surge, unavailable in ((0, "0%"), ("0%", "0%"), ("00%", 0)):
        rollout = {"maxSurge": surge, "maxUnavailable": unavailable}
        errors = validate_object(
            bad_manifest({**case, "spec": {**case["spec"], "rollout": rollout}})
        )
        assert [e.path for e in errors] == ["spec.rollout"], (rollout, errors)
