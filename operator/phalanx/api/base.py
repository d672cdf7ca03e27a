"""The base of every API model: camelCase wire names, strictness, and cross-field rules.

A cross-field rule is written once, as a `Rule`: its CEL expression goes into the CRD
(`x-kubernetes-validations`, enforced by the API server at `kubectl apply`) and its Python
predicate runs in `phalanx validate` and in the operator, so both reject the same specs
with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """A cross-field validation rule, enforced by CEL in the API server and by `check` here.

    `field` is the path (relative to the model, e.g. ".preferred") reported with the error.
    `check` returns True when the model is valid; None means the rule needs the old object
    (a transition rule) and is enforced by the API server only.
    """

    cel: str
    message: str
    field: str = ""
    check: Callable[[Any], bool] | None = None
    reason: str = "FieldValueInvalid"

    def to_crd(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field:
            rule["fieldPath"] = self.field
        if self.reason != "FieldValueInvalid":
            rule["reason"] = self.reason
        return rule


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected and no type coercion
    (a quoted integer or "true" is refused, as the API server refuses them)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        validate_default=False,
        use_attribute_docstrings=False,
    )

    # Cross-field rules of this object; the CRD generator and `rule_violations` read them.
    checks: ClassVar[tuple[Rule, ...]] = ()

    def wire(self) -> dict[str, Any]:
        """The object as it appears in the API (camelCase, without unset optional fields)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def section(model: type[ApiModel], description: str) -> Any:
    """A nested object that always exists, so the API server applies its fields' defaults."""
    # The full default object, not {}: the API server checks defaults against CEL rules as
    # they are, without filling in nested defaults first.
    default = model().wire()
    return Field(
        default_factory=model, description=description, json_schema_extra={"default": default}
    )


def rule_violations(model: BaseModel, path: str) -> list[tuple[str, str]]:
    """Every (field path, message) whose Rule fails, walking the whole model tree; also the
    repeated keys of `x-kubernetes-list-type: map` lists, which the API server refuses."""
    found: list[tuple[str, str]] = []
    if isinstance(model, ApiModel):
        for rule in type(model).checks:
            if rule.check is not None and not rule.check(model):
                found.append((path + rule.field, rule.message))
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{path}.{field.alias or name}"
        if isinstance(value, BaseModel):
            found += rule_violations(value, key)
        elif isinstance(value, list):
            found += _duplicate_keys(field.json_schema_extra, value, key)
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found += rule_violations(item, f"{key}[{i}]")
    return found


def _duplicate_keys(extra: Any, items: list[Any], path: str) -> list[tuple[str, str]]:
    """The entries of a keyed list whose key an earlier entry already has (reported at the
    later entry, as the API server does)."""
    if not isinstance(extra, dict) or extra.get("x-kubernetes-list-type") != "map":
        return []
    keys = [str(k) for k in extra.get("x-kubernetes-list-map-keys") or ()]
    seen: set[tuple[Any, ...]] = set()
    found = []
    for i, item in enumerate(items):
        wire = item.wire() if isinstance(item, ApiModel) else item
        value = tuple(wire.get(k) for k in keys) if isinstance(wire, dict) else (wire,)
        if value in seen:
            shown = ", ".join(f"{k}={v}" for k, v in zip(keys, value, strict=True))
            found.append((f"{path}[{i}]", f"duplicate entry ({shown}): each must be unique"))
        seen.add(value)
    return found
