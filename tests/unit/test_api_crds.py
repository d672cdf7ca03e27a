"""The CRDs in crds/ are exactly what the models generate, and structurally sound."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from phalanx.api.crd import all_crds, to_yaml
from phalanx.api.inference import InferenceServiceStatus, InferenceServiceStatusFields
from phalanx.api.trainjob import LLMTrainJobStatus, LLMTrainJobStatusFields

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_committed_crd_matches_models(name: str) -> None:
    committed = (CRDS / name).read_text(encoding="utf-8")
    assert committed == to_yaml(all_crds()[name]), f"crds/{name} drifted: run `make crds`"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.get("properties", {}).items():
            yield from _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _schemas() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, crd in all_crds().items():
        version = crd["spec"]["versions"][0]
        yield from ((f"{name}:{p}", n) for p, n in _walk(version["schema"]["openAPIV3Schema"]))


def test_every_node_is_structural() -> None:
    for path, node in _schemas():
        assert "$ref" not in node, path
        assert "title" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        for option in node.get("anyOf", []):
            assert option.get("type") != "null", f"{path} uses a null union instead of nullable"


def test_unknown_fields_are_preserved_only_inside_allowed_pod_template_fields() -> None:
    """The overlay's PodSpec is typed (an allow-list): hostNetwork, serviceAccountName or
    schedulingGates are unknown fields; only free-form leaves such as affinity are kept."""
    preserved = {
        p.split(":")[1] for p, n in _schemas() if n.get("x-kubernetes-preserve-unknown-fields")
    }
    leaves = {
        f".spec.podTemplate.spec.{leaf}" for leaf in ("affinity", "topologySpreadConstraints[]")
    }
    leaves |= {
        f".spec.podTemplate.spec.volumes[].{kind}"
        for kind in ("configMap", "secret", "projected", "downwardAPI", "csi", "ephemeral")
    }
    assert preserved == leaves


def test_every_spec_field_is_described() -> None:
    missing = [
        p
        for p, n in _schemas()
        if ".spec." in p and "description" not in n and not p.endswith(("[]", "{}"))
    ]
    assert missing == []


def test_inference_service_has_scale_subresource() -> None:
    crd = all_crds()["phalanx.dev_inferenceservices.yaml"]
    scale = crd["spec"]["versions"][0]["subresources"]["scale"]
    assert scale == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert crd["spec"]["names"]["shortNames"] == ["lis"]


def test_trainjob_printer_columns_and_names() -> None:
    crd = all_crds()["phalanx.dev_llmtrainjobs.yaml"]
    printed = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    columns = [c["name"] for c in printed]
    assert columns == [
        "State", "Nodes", "GPUs", "Domain", "Progress", "Loss", "ValLoss", "Tokens/s",
        "ETA(s)", "Restarts", "ETTR", "Queue", "Start(est)", "Age",
    ]  # fmt: skip
    # Validation loss, throughput, ETA, ETTR and the queue are `kubectl get -o wide` columns:
    # the default view stays narrow.
    priorities = {c["name"]: c.get("priority", 0) for c in printed}
    assert [name for name, priority in priorities.items() if priority == 1] == [
        "ValLoss", "Tokens/s", "ETA(s)", "ETTR", "Queue", "Start(est)",
    ]  # fmt: skip
    assert crd["spec"]["names"]["shortNames"] == ["ltj"]
    assert "phalanx" in crd["spec"]["names"]["categories"]


def test_cel_rules_carry_messages_and_field_paths() -> None:
    rules = [rule for _, node in _schemas() for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 15
    for rule in rules:
        assert rule["message"].strip(), rule
    crd = yaml.safe_load(to_yaml(all_crds()["phalanx.dev_llmtrainjobs.yaml"]))
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    assert any("oldSelf" in r["rule"] for r in root), "the gang-shape transition rule is missing"


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (LLMTrainJobStatus, LLMTrainJobStatusFields),
        (InferenceServiceStatus, InferenceServiceStatusFields),
    ],
    ids=["llmtrainjob", "inferenceservice"],
)
def test_the_planners_status_dicts_have_exactly_the_models_fields(
    model: type[BaseModel], fields: type
) -> None:
    assert set(fields.__annotations__) == {f.alias for f in model.model_fields.values()}
