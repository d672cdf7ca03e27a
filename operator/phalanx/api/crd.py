"""Generate CustomResourceDefinitions from the pydantic models (the single source of truth).

Pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3 subset:
every node typed, refs inlined, no titles, `nullable` instead of `anyOf [X, null]`, boolean
`exclusiveMinimum`, int-or-string marked, and CEL rules under `x-kubernetes-validations`.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from phalanx.constants import (
    GROUP,
    INFERENCE_KIND,
    INFERENCE_PLURAL,
    TRAINJOB_KIND,
    TRAINJOB_PLURAL,
    VERSION,
)

from . import inference, trainjob
from .base import ApiModel, Rule
from .common import QUANTITY_KEY, QUANTITY_MESSAGES
from .validate import DNS_LABEL_PATTERN, MAX_NAME_LENGTH

_DROP = {"title", "$defs", "discriminator"}

# Names become pod host names (`<job>-<rank>`): a DNS label, not the DNS subdomain the API
# server allows for custom objects by default, so a dot is refused at admission.
METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": MAX_NAME_LENGTH, "pattern": DNS_LABEL_PATTERN}
    },
}


def _rules_by_title(model: type[BaseModel], out: dict[str, tuple[Rule, ...]]) -> None:
    """Map each model's JSON-schema title to its rules, so refs can carry them after inlining."""
    if issubclass(model, ApiModel) and model.checks:
        out[model.__name__] = model.checks
    for field in model.model_fields.values():
        for arg in _model_types(field.annotation):
            if arg.__name__ not in out:
                _rules_by_title(arg, out)


def model_rules(model: type[BaseModel]) -> list[Rule]:
    """Every cross-field Rule of a model and the models inside it (the CRD carries them all)."""
    found: dict[str, tuple[Rule, ...]] = {}
    _rules_by_title(model, found)
    return [rule for rules in found.values() for rule in rules]


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    for arg in getattr(annotation, "__args__", ()) or ():
        found += _model_types(arg)
    meta = getattr(annotation, "__origin__", None)
    if meta is not None and isinstance(meta, type) and issubclass(meta, BaseModel):
        found.append(meta)
    return found


def _structural(node: Any, defs: dict[str, Any], rules: dict[str, tuple[Rule, ...]]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs, rules) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    extra: dict[str, Any] = {}
    if len(node.get("allOf", ())) == 1:
        node = {**node.pop("allOf")[0], **node}
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        # Sibling keywords (description, default) win over the referenced schema's own.
        node = {**defs[name], **node}
        if name in rules:
            extra["x-kubernetes-validations"] = [rule.to_crd() for rule in rules[name]]
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if not options:
            continue
        non_null = [o for o in options if o != {"type": "null"}]
        if len(non_null) < len(options):
            node["nullable"] = True
        if len(non_null) == 1:
            del node[key]
            node = {**_structural(non_null[0], defs, rules), **node}
        elif node.get("x-kubernetes-int-or-string") or _int_or_string(non_null):
            del node[key]
            node["x-kubernetes-int-or-string"] = True
            # A structural schema cannot put a pattern inside the int-or-string anyOf, so the
            # string form is checked by CEL instead.
            patterns = [o["pattern"] for o in non_null if "pattern" in o]
            quantity = [o[QUANTITY_KEY] for o in non_null if QUANTITY_KEY in o]
            # Bounded strings keep CEL's cost estimate small.
            node["maxLength"] = max(o.get("maxLength", 0) for o in non_null) or 64
            if quantity:
                node["x-kubernetes-validations"] = [_quantity_rule(quantity[0])]
            elif patterns:
                node["x-kubernetes-validations"] = [_string_form_rule(patterns[0])]
        else:
            node[key] = [_structural(o, defs, rules) for o in non_null]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string" if all(isinstance(v, str) for v in node["enum"]) else "integer"
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[plain] = node[bound]
            node[bound] = True
    if node.get("default", 0) is None:
        del node["default"]
    if node.get("nullable") and "default" in node and node["default"] is None:
        del node["default"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs, rules) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs, rules)
        elif key == "additionalProperties" and isinstance(value, bool):
            continue  # unknown fields: rejected by the API server, or preserved (below)
        else:
            out[key] = value
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    out.update(extra)
    return out


def _quantity_rule(kind: str) -> dict[str, str]:
    """A quantity in either form: the grammar of Kubernetes quantities, then its sign."""
    sign, bound = (
        ("quantity(self).isGreaterThan(quantity('0'))", "> 0")
        if kind == "positive"
        else ("!quantity(self).isLessThan(quantity('0'))", ">= 0")
    )
    return {
        "rule": f"type(self) == string ? isQuantity(self) && {sign} : self {bound}",
        "message": QUANTITY_MESSAGES[kind],
    }


def _string_form_rule(pattern: str) -> dict[str, str]:
    return {
        "rule": f"type(self) == string ? self.matches('{pattern}') : self >= 0",
        "message": "must be a count or a percentage such as 25%",
    }


def _int_or_string(options: list[dict[str, Any]]) -> bool:
    return sorted(o.get("type", "") for o in options) == ["integer", "string"]


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one API model, ready for a CRD version."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    rules: dict[str, tuple[Rule, ...]] = {}
    _rules_by_title(model, rules)
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}), rules)
    if issubclass(model, ApiModel) and model.checks:
        schema["x-kubernetes-validations"] = [rule.to_crd() for rule in model.checks]
    return schema


def _resource_schema(
    spec: type[BaseModel], status: type[BaseModel], description: str
) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": METADATA_SCHEMA,
            "spec": openapi_schema(spec),
            "status": openapi_schema(status),
        },
        "required": ["spec"],
    }


def _crd(
    kind: str,
    plural: str,
    short: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
    subresources: dict[str, Any],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "phalanx", "app.kubernetes.io/part-of": "phalanx"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["phalanx", "all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def trainjob_crd() -> dict[str, Any]:
    schema = _resource_schema(
        trainjob.LLMTrainJobSpec,
        trainjob.LLMTrainJobStatus,
        trainjob.LLMTrainJob.__doc__ or "",
    )
    schema["x-kubernetes-validations"] = [trainjob.GANG_SHAPE_RULE.to_crd()]
    return _crd(
        TRAINJOB_KIND, TRAINJOB_PLURAL, "ltj", schema, trainjob.PRINTER_COLUMNS, {"status": {}}
    )


def inference_crd() -> dict[str, Any]:
    schema = _resource_schema(
        inference.InferenceServiceSpec,
        inference.InferenceServiceStatus,
        inference.InferenceService.__doc__ or "",
    )
    scale = {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    return _crd(
        INFERENCE_KIND,
        INFERENCE_PLURAL,
        "lis",
        schema,
        inference.PRINTER_COLUMNS,
        {"status": {}, "scale": scale},
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD object, for every resource Phalanx defines."""
    return {
        f"{GROUP}_{TRAINJOB_PLURAL}.yaml": trainjob_crd(),
        f"{GROUP}_{INFERENCE_PLURAL}.yaml": inference_crd(),
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Shared sub-schemas are written out in full: anchors confuse readers and some tools."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: dict[str, Any]) -> str:
    header = "# Generated by `phalanx crds` from phalanx.api; do not edit.\n"
    return header + yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False, width=100)
