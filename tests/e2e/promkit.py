"""The shipped Grafana dashboards, run against a real Prometheus as Grafana would run them."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "phalanx" / "dashboards"
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\)$")


@dataclass(frozen=True)
class Panel:
    dashboard: str
    title: str
    expr: str


@dataclass(frozen=True)
class Variable:
    dashboard: str
    name: str
    selector: str
    label: str


def _load(name: str) -> dict[str, Any]:
    return json.loads((DASHBOARDS / name).read_text())  # type: ignore[no-any-return]


def panels(name: str) -> list[Panel]:
    return [
        Panel(name, panel["title"], target["expr"])
        for panel in _load(name)["panels"]
        for target in panel.get("targets", [])
    ]


def variables(name: str) -> list[Variable]:
    found = []
    for variable in _load(name)["templating"]["list"]:
        if variable.get("type") != "query":
            continue
        match = LABEL_VALUES.match(variable["query"])
        assert match, f"{name}: variable {variable['name']} is not a label_values() query"
        found.append(Variable(name, variable["name"], match["selector"], match["label"]))
    return found


REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")


def substitute(text: str, values: dict[str, str]) -> str:
    """Grafana's interpolation of a single-valued variable into a `=~"$var"` matcher: regex
    metacharacters escaped with a backslash that is itself escaped in the PromQL string."""
    for name, value in values.items():
        text = text.replace(f"${name}", REGEX_SPECIAL.sub(r"\\\\\1", value))
    assert "$" not in text, f"a variable is left in {text!r}"
    return text


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, path: str, **params: str | list[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{path} {params}: {error.code} {error.read()[:500]!r}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self._get("/api/v1/query", query=expr)["result"]  # type: ignore[no-any-return]

    def label_values(self, label: str, selector: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": [selector]})  # type: ignore[no-any-return]

    def targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets")["activeTargets"]  # type: ignore[no-any-return]


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a number (a histogram quantile over no observations is NaN)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def missing(prometheus: Prometheus, dashboard: str, values: dict[str, str]) -> list[str]:
    """The panel queries of `dashboard` that return no data for `values`, as readable lines."""
    return [
        f"{panel.title}: {expr}"
        for panel in panels(dashboard)
        if not has_data(prometheus.query(expr := substitute(panel.expr, values)))
    ]


def unlisted(prometheus: Prometheus, dashboard: str, values: dict[str, str]) -> list[str]:
    """The dashboard variables whose choices do not offer the value in `values`."""
    lines = []
    for variable in variables(dashboard):
        choices = prometheus.label_values(variable.label, substitute(variable.selector, values))
        if values[variable.name] not in choices:
            lines.append(f"${variable.name} offers {choices}, not {values[variable.name]!r}")
    return lines
