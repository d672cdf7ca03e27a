"""The Helm chart: CRDs in step with crds/, values checked by their schema, dashboards that
query only metrics Phalanx really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from phalanx import metrics as operator_metrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "phalanx"


def test_chart_crds_match_generated_crds() -> None:
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == generated
    for name in generated:
        assert (CHART / "crds" / name).read_text() == (ROOT / "crds" / name).read_text(), (
            f"run `make crds` ({name})"
        )


def schema() -> dict[str, Any]:
    return dict(json.loads((CHART / "values.schema.json").read_text()))


def test_default_values_match_the_schema() -> None:
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema())


@pytest.mark.parametrize(
    "bad",
    [
        {"operator": {"workers": 0}},
        {"operator": {"topolgy": "gke"}},
        {"serviceMonitor": {"interval": "soon"}},
        {"image": {"pullPolicy": "Sometimes", "repository": "r", "tag": "t"}},
    ],
    ids=["workers-zero", "misspelt-key", "bad-interval", "bad-pull-policy"],
)
def test_bad_values_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema())


def exported_names() -> set[str]:
    """Every sample name the operator, the trainer and the inference server can expose."""
    from phalanx_serve.metrics import ServeMetrics
    from phalanx_trainer.metrics import TrainMetrics

    registries: list[CollectorRegistry] = [
        operator_metrics.REGISTRY,
        TrainMetrics(total_steps=1).registry,
    ]
    serve = CollectorRegistry()
    ServeMetrics("m", registry=serve)
    registries.append(serve)
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""],
            }
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


@pytest.mark.parametrize(
    "dashboard", sorted((CHART / "dashboards").glob("*.json")), ids=lambda p: p.stem
)
def test_dashboards_query_real_metrics(dashboard: Path) -> None:
    data = json.loads(dashboard.read_text())
    known = exported_names()
    used = {
        name
        for panel in data["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(phalanx_[a-z_]+|controller_runtime_[a-z_]+)\b", target["expr"])
    }
    assert used, "a dashboard without queries"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"
