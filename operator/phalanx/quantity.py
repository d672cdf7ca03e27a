"""Kubernetes resource quantities: parsing "500m", "2Gi", "1e3" into exact numbers and integers.

Placement works on integers only: cpu in millicores (Kubernetes' own granularity for cpu) and every
other resource in plain units (bytes for memory and storage, devices for extended resources).
Rounding goes up, as Kubernetes' ``Quantity.Value()``/``MilliValue()`` do, so a request is never
under-counted.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# Resources Kubernetes accounts in thousandths; everything else is accounted in whole units.
MILLI_RESOURCES: frozenset[str] = frozenset({"cpu"})

_BINARY_SUFFIXES: dict[str, int] = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_DECIMAL_SUFFIXES: dict[str, Fraction] = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
# The exponent form is tried before the bare "E" (exa) suffix, as the Kubernetes parser does:
# "1E3" is one thousand, "1E" is one exa.
_QUANTITY = re.compile(
    r"(?P<sign>[+-]?)(?P<number>\d+(?:\.\d*)?|\.\d+)"
    r"(?:[eE](?P<exponent>[+-]?\d+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?))"
)


def parse_quantity(quantity: str | int | float) -> Fraction:
    """The exact value of a Kubernetes quantity ("500m" -> 1/2, "2Gi" -> 2147483648)."""
    if isinstance(quantity, bool):
        raise TypeError(f"invalid quantity {quantity!r}: expected a string or a number")
    if isinstance(quantity, int):
        return Fraction(quantity)
    if isinstance(quantity, float):
        # YAML turns "cpu: 0.5" into a float; its shortest repr is what the user wrote.
        if not math.isfinite(quantity):
            raise ValueError(f"invalid quantity {quantity!r}: must be finite")
        return Fraction(Decimal(repr(quantity)))
    if not isinstance(quantity, str):
        raise TypeError(f"invalid quantity {quantity!r}: expected a string or a number")
    match = _QUANTITY.fullmatch(quantity.strip())
    if match is None:
        raise ValueError(
            f"invalid quantity {quantity!r}: expected a number with an optional suffix "
            "such as 500m, 2Gi, 64G or 1e3"
        )
    try:
        value = Fraction(Decimal(match["number"]))
    except InvalidOperation as err:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"invalid quantity {quantity!r}") from err
    if match["exponent"] is not None:
        value *= Fraction(10) ** int(match["exponent"])
    elif match["suffix"] in _BINARY_SUFFIXES:
        value *= _BINARY_SUFFIXES[match["suffix"]]
    else:
        value *= _DECIMAL_SUFFIXES[match["suffix"]]
    return -value if match["sign"] == "-" else value


def to_units(quantity: str | int | float) -> int:
    """The quantity in whole units, rounded up ("1.5" -> 2, "2Gi" -> 2147483648)."""
    return math.ceil(parse_quantity(quantity))


def to_milli(quantity: str | int | float) -> int:
    """The quantity in thousandths, rounded up ("500m" -> 500, "2" -> 2000, "1u" -> 1)."""
    return math.ceil(parse_quantity(quantity) * 1000)


def resource_amount(resource: str, quantity: str | int | float) -> int:
    """A request or capacity as the integer placement uses: millicores for cpu, units otherwise."""
    amount = to_milli(quantity) if resource in MILLI_RESOURCES else to_units(quantity)
    if amount < 0:
        raise ValueError(f"invalid quantity {quantity!r} for {resource}: must not be negative")
    return amount


def format_amount(resource: str, amount: int) -> str:
    """An integer from ``resource_amount`` written back the way a person would write it."""
    if resource in MILLI_RESOURCES:
        return str(amount // 1000) if amount % 1000 == 0 else f"{amount}m"
    if amount > 0 and _is_byte_resource(resource):
        for suffix, factor in reversed(_BINARY_SUFFIXES.items()):
            if amount % factor == 0:
                return f"{amount // factor}{suffix}"
    return str(amount)


def _is_byte_resource(resource: str) -> bool:
    return resource in {"memory", "ephemeral-storage", "storage"} or resource.startswith(
        "hugepages-"
    )
