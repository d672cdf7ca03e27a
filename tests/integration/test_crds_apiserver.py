"""The generated CRDs as a real kube-apiserver sees them: structural schemas, descriptions,
examples that apply, invalid manifests that are rejected, and printer columns."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from phalanx.api import InferenceServiceSpec, LLMTrainJobSpec
from phalanx.api.crd import model_rules
from phalanx.api.validate import validate_object
from phalanx.devcluster.testing import Kubectl, wait_for

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO_ROOT / "jobs").glob("*.yaml"))
INVALID = sorted((REPO_ROOT / "tests" / "manifests" / "invalid").glob("*.yaml"))
BAD_TABLE = yaml.safe_load((REPO_ROOT / "tests" / "manifests" / "bad-table.yaml").read_text())
RULE_TABLE = yaml.safe_load((REPO_ROOT / "tests" / "manifests" / "rule-table.yaml").read_text())
RULES = [
    rule
    for spec in (LLMTrainJobSpec, InferenceServiceSpec)
    for rule in model_rules(spec)
    if rule.check is not None
]
PRINTER_COLUMNS = ("STATE", "NODES", "GPUS", "DOMAIN", "PROGRESS", "LOSS", "RESTARTS", "AGE")


def header_comments(path: Path) -> dict[str, str]:
    """The leading `# key: value` comment lines of a manifest."""
    comments = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#\s*([\w-]+):\s*(.*?)\s*$", line)
        if not match:
            break
        comments[match.group(1)] = match.group(2)
    return comments


def rejected_by_apiserver(path: Path) -> bool:
    return header_comments(path).get("apiserver", "true").lower() != "false"


def crd_schema(kind_plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((REPO_ROOT / "crds" / f"phalanx.dev_{kind_plural}.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def squash(text: str) -> str:
    return " ".join(text.split())


def test_crds_are_established_structural_schemas(kubectl: Kubectl, crds: list[str]) -> None:
    for name in crds:
        conditions = {
            c["type"]: c for c in kubectl.json("get", "crd", name)["status"]["conditions"]
        }
        assert conditions["Established"]["status"] == "True", name
        assert "NonStructuralSchema" not in conditions, conditions["NonStructuralSchema"]["message"]


def test_explain_prints_our_topology_descriptions(kubectl: Kubectl, crds: list[str]) -> None:
    topology = crd_schema("llmtrainjobs")["properties"]["spec"]["properties"]["topology"]

    # The API server publishes a new CRD's OpenAPI schema a moment after it is Established.
    def explain() -> str | None:
        result = kubectl("explain", "llmtrainjob.spec.topology", check=False)
        return result.stdout if result.returncode == 0 else None

    explained = squash(wait_for(explain, 60, "kubectl explain to know llmtrainjobs"))

    assert squash(topology["description"]) in explained
    for field, schema in topology["properties"].items():
        assert field in explained
        assert squash(schema["description"])[:60] in explained


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_applies(kubectl: Kubectl, crds: list[str], namespace: str, example: Path) -> None:
    kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(example))


@pytest.mark.parametrize(
    "manifest",
    [p for p in INVALID if rejected_by_apiserver(p)],
    ids=lambda p: p.stem,
)
def test_invalid_manifest_is_rejected_naming_the_field(
    kubectl: Kubectl, crds: list[str], namespace: str, manifest: Path
) -> None:
    field = header_comments(manifest).get("field")
    assert field, f"{manifest.name} lacks a '# field: <path>' header"

    result = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(manifest), check=False)

    assert result.returncode != 0, f"{manifest.name} was accepted"
    assert field in result.stderr, result.stderr


def test_get_shows_the_printer_columns(kubectl: Kubectl, crds: list[str], namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", str(REPO_ROOT / "jobs" / "tiny-cpu.yaml"))

    header = kubectl("get", "ltj", "-n", namespace).stdout.splitlines()[0].split()

    assert header == ["NAME", *PRINTER_COLUMNS]


def table_manifest(case: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": case.get("kind", "LLMTrainJob"),
        "metadata": {"name": case.get("name", case["id"])},
        "spec": case["spec"],
    }


def names_field(paths: list[str], field: str) -> bool:
    """A path is the field, or a key of the map it is (the API server writes `map[key]`)."""
    return any(p == field or p.startswith(field + ".") for p in paths)


def server_dry_run(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> str:
    """The API server's refusal of a manifest ('' when it accepts it), sent as JSON so that
    a quoted integer stays a string."""
    result = kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-",
        stdin=json.dumps(manifest), check=False,
    )  # fmt: skip
    return "" if result.returncode == 0 else result.stderr


@pytest.mark.parametrize("case", BAD_TABLE, ids=lambda c: c["id"])
def test_bad_table_is_rejected_by_both_naming_the_same_field(
    kubectl: Kubectl, crds: list[str], namespace: str, case: dict[str, Any]
) -> None:
    manifest = table_manifest(case)

    refusal = server_dry_run(kubectl, namespace, manifest)
    offline = [e.path for e in validate_object(manifest)]

    assert refusal, f"the API server accepted {case['id']}"
    assert case["field"] in refusal, refusal
    assert names_field(offline, case["field"]), offline


@pytest.mark.parametrize("case", RULE_TABLE, ids=lambda c: c["id"])
def test_every_rule_gives_one_answer_on_both_sides(
    kubectl: Kubectl, crds: list[str], namespace: str, case: dict[str, Any]
) -> None:
    manifest = table_manifest(case)

    refusal = server_dry_run(kubectl, namespace, manifest)
    by_server = {rule.message for rule in RULES if rule.message in refusal}
    by_python = {e.message for e in validate_object(manifest)}

    assert by_server == by_python, refusal
    assert bool(refusal) == bool(by_python), refusal
