"""Offline validation of manifests: the same verdicts the API server gives, with field paths."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from phalanx.constants import API_VERSION, INFERENCE_KIND, TRAINJOB_KIND

from .base import rule_violations
from .common import QUANTITY_ERROR
from .inference import PERCENT_PATTERN, InferenceService
from .pod_security import refused
from .trainjob import LLMTrainJob

# Job pods are named `<job>-<rank>` and double as DNS host names (63 characters at most).
MAX_NAME_LENGTH = 50
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)
MODELS: dict[str, type[BaseModel]] = {TRAINJOB_KIND: LLMTrainJob, INFERENCE_KIND: InferenceService}


@dataclass(frozen=True)
class FieldError:
    """One problem in a manifest: where (a field path like spec.topology.preferred) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """A manifest the API would reject; carries every problem found, not just the first."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _is_union_tag(part):
            continue  # pydantic names the union branch it tried; users think in fields
        else:
            path += f".{part}" if path else part
    return path


def _is_union_tag(part: str) -> bool:
    return part in {"int", "str", "float", "bool"} or part.startswith("constrained-") or "[" in part


# Patterns of int-or-string fields, explained in words rather than regular expressions.
_PATTERN_MEANING = {PERCENT_PATTERN: "must be a count or a percentage such as 25%"}


def _explains(item: Any) -> bool:
    """The error of an int-or-string field's string branch, which says what the format is."""
    return item["type"] == QUANTITY_ERROR or (item.get("ctx") or {}).get("pattern") in (
        _PATTERN_MEANING
    )


def _message(item: Any) -> str:
    kind = item["type"]
    if kind == "extra_forbidden":
        return "unknown field; check the spelling (fields are camelCase) or remove it"
    if kind == "missing":
        return "required field is missing"
    pattern = (item.get("ctx") or {}).get("pattern")
    if pattern in _PATTERN_MEANING:
        return _PATTERN_MEANING[pattern]
    return str(item["msg"])


def _pydantic_errors(error: ValidationError) -> list[FieldError]:
    by_path: dict[str, list[Any]] = {}
    for item in error.errors(include_url=False):
        by_path.setdefault(_loc_to_path(tuple(item["loc"])), []).append(item)
    found = []
    for path, items in by_path.items():
        # An int-or-string field fails once per branch; the string branch explains the format.
        explained = [i for i in items if _explains(i)]
        if len(items) > 1 and not explained:
            # An int-or-string given a number out of range fails its string branch too.
            explained = [i for i in items if i["type"] != "string_type"]
        found.append(FieldError(path, _message((explained or items)[0])))
    return found


def _metadata_errors(obj: dict[str, Any]) -> list[FieldError]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return [FieldError("metadata", "must be an object with at least a name")]
    name = metadata.get("name")
    if name is None:
        return (
            []
            if metadata.get("generateName")
            else [FieldError("metadata.name", "required field is missing")]
        )
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        return [
            FieldError("metadata.name", "must be a DNS label: lower-case letters, digits and '-'")
        ]
    if len(name) > MAX_NAME_LENGTH:
        return [
            FieldError(
                "metadata.name",
                f"must be at most {MAX_NAME_LENGTH} characters (pod host names append the rank)",
            )
        ]
    return []


def validate_object(obj: Any, pod_security: str | None = None) -> list[FieldError]:
    """Every problem in one manifest; an empty list means the API server would accept it.

    With `pod_security` (a namespace's level), also the pod-template fields the operator
    would refuse in a namespace of that level, in the words of its condition.
    """
    model, errors = _check(obj)
    if pod_security is None or model is None:
        return errors
    template = getattr(getattr(model, "spec", None), "pod_template", None)
    return errors + [
        FieldError(r.field, r.refusal(pod_security).partition(": ")[2])
        for r in refused(template, pod_security)
    ]


def parse(obj: dict[str, Any], model: type[BaseModel]) -> Any:
    """The validated model of a manifest (validated once), or SpecError listing everything
    wrong with it."""
    parsed, errors = _check(obj)
    if errors:
        raise SpecError(errors)
    if not isinstance(parsed, model):
        raise SpecError([FieldError("kind", f"expected {model.__name__}, got {obj.get('kind')}")])
    return parsed


def _check(obj: Any) -> tuple[BaseModel | None, list[FieldError]]:
    """The model of a manifest and every problem found in it."""
    if not isinstance(obj, dict):
        return None, [
            FieldError("", "a manifest must be a mapping with apiVersion, kind, metadata and spec")
        ]
    kind = obj.get("kind")
    if obj.get("apiVersion") != API_VERSION or kind not in MODELS:
        return None, [
            FieldError(
                "apiVersion" if obj.get("apiVersion") != API_VERSION else "kind",
                f"expected apiVersion {API_VERSION} and kind {' or '.join(MODELS)}, "
                f"got {obj.get('apiVersion')!r} / {kind!r}",
            )
        ]
    errors = _metadata_errors(obj)
    body = {k: v for k, v in obj.items() if k != "status"}
    try:
        model = MODELS[kind].model_validate(body)
    except ValidationError as exc:
        return None, errors + _pydantic_errors(exc)
    return model, errors + [FieldError(p.lstrip("."), m) for p, m in rule_violations(model, "")]


def load_documents(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, object) for each YAML document in a file, skipping empty ones."""
    with path.open(encoding="utf-8") as handle:
        for index, doc in enumerate(yaml.safe_load_all(handle)):
            if doc is not None:
                yield index, doc
