"""Kubernetes quantity parsing and the integer units placement works in."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.quantity import (
    format_amount,
    parse_quantity,
    resource_amount,
    to_milli,
    to_units,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        pytest.param("8", Fraction(8), id="plain-integer"),
        pytest.param("500m", Fraction(1, 2), id="milli"),
        pytest.param("2Gi", Fraction(2 * 2**30), id="gibi"),
        pytest.param("1.5Ki", Fraction(1536), id="fractional-binary"),
        pytest.param("64G", Fraction(64 * 10**9), id="giga"),
        pytest.param("1k", Fraction(1000), id="kilo"),
        pytest.param("1e3", Fraction(1000), id="exponent"),
        pytest.param("1E3", Fraction(1000), id="capital-exponent-is-not-exa"),
        pytest.param("1E", Fraction(10**18), id="exa"),
        pytest.param("1Ei", Fraction(2**60), id="exbi"),
        pytest.param("2e-3", Fraction(2, 1000), id="negative-exponent"),
        pytest.param("0.5", Fraction(1, 2), id="decimal"),
        pytest.param(".5", Fraction(1, 2), id="leading-dot"),
        pytest.param("1.", Fraction(1), id="trailing-dot"),
        pytest.param("+1", Fraction(1), id="plus-sign"),
        pytest.param("-1", Fraction(-1), id="minus-sign"),
        pytest.param("100n", Fraction(1, 10**7), id="nano"),
        pytest.param("3u", Fraction(3, 10**6), id="micro"),
        pytest.param(" 4 ", Fraction(4), id="surrounding-space"),
        pytest.param(8, Fraction(8), id="int"),
        pytest.param(0.25, Fraction(1, 4), id="float-from-yaml"),
        pytest.param(0.1, Fraction(1, 10), id="float-shortest-repr"),
    ],
)
def test_parse_quantity(text: str | int | float, value: Fraction) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("abc", id="word"),
        pytest.param("Gi", id="suffix-only"),
        pytest.param("1 Gi", id="inner-space"),
        pytest.param("1GiB", id="unknown-suffix"),
        pytest.param("1.2.3", id="two-dots"),
        pytest.param("1e", id="exponent-without-digits"),
        pytest.param("1e3.5", id="fractional-exponent"),
        pytest.param("0x10", id="hex"),
    ],
)
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity(text)


@pytest.mark.parametrize("value", [True, None, [1]], ids=["bool", "none", "list"])
def test_parse_quantity_rejects_other_types(value: object) -> None:
    with pytest.raises(TypeError):
        parse_quantity(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("resource", "text", "amount"),
    [
        pytest.param("cpu", "2", 2000, id="cpu-cores-to-millicores"),
        pytest.param("cpu", "100m", 100, id="cpu-millicores"),
        pytest.param("cpu", "1.5m", 2, id="cpu-rounds-up"),
        pytest.param("cpu", "1u", 1, id="cpu-tiny-rounds-up"),
        pytest.param("memory", "512Gi", 512 * 2**30, id="memory-bytes"),
        pytest.param("memory", "1.5", 2, id="memory-rounds-up"),
        pytest.param("nvidia.com/gpu", "8", 8, id="extended-resource"),
        pytest.param("pods", 110, 110, id="pods-int"),
        pytest.param("ephemeral-storage", "1e9", 10**9, id="storage-exponent"),
    ],
)
def test_resource_amount(resource: str, text: str | int, amount: int) -> None:
    assert resource_amount(resource, text) == amount


def test_resource_amount_rejects_negative() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        resource_amount("memory", "-1Gi")


def test_rounding_helpers_round_up() -> None:
    assert to_units("1.1") == 2
    assert to_units("-1.5") == -1
    assert to_milli("0.0001") == 1


@pytest.mark.parametrize(
    ("resource", "amount", "text"),
    [
        pytest.param("cpu", 2000, "2", id="whole-cores"),
        pytest.param("cpu", 500, "500m", id="millicores"),
        pytest.param("memory", 64 * 2**30, "64Gi", id="gibibytes"),
        pytest.param("memory", 1536, "1536", id="not-a-whole-binary-unit"),
        pytest.param("memory", 3 * 2**10, "3Ki", id="kibibytes"),
        pytest.param("memory", 0, "0", id="zero"),
        pytest.param("hugepages-2Mi", 2**21, "2Mi", id="hugepages"),
        pytest.param("nvidia.com/gpu", 8, "8", id="devices"),
    ],
)
def test_format_amount(resource: str, amount: int, text: str) -> None:
    assert format_amount(resource, amount) == text


@settings(max_examples=200, deadline=None)
@given(
    resource=st.sampled_from(["cpu", "memory", "nvidia.com/gpu"]),
    amount=st.integers(min_value=0, max_value=2**62),
)
def test_format_amount_parses_back(resource: str, amount: int) -> None:
    assert resource_amount(resource, format_amount(resource, amount)) == amount


@settings(max_examples=200, deadline=None)
@given(millis=st.integers(min_value=0, max_value=10**12))
def test_milli_suffix_is_exact(millis: int) -> None:
    assert to_milli(f"{millis}m") == millis
    assert parse_quantity(f"{millis}m") == Fraction(millis, 1000)
