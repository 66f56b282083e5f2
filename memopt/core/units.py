"""Binary byte units and percentages: format for people, parse from the command line."""

import math
import re

from memopt.core.errors import MemoptError

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
MAX_SIZE = 2**60  # 1 EiB: anything larger is a typo


def format_bytes(n: int | float) -> str:
    """1536 -> '1.50 KiB'; always binary units, as the house style wants."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str, option: str = "size") -> int:
    """'8GiB', '512 MiB', '2e9' -> bytes; ``option`` names the flag in the error. Decimal units (GB) mean
    powers of ten; a bare number is bytes and must be whole."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MemoptError(f"{option} {text!r}: expected a number with a unit such as 512MiB, 8GiB or 24GB")
    number, unit = float(m.group(1)), m.group(2).lower()
    value = number * _UNITS[unit]
    if not math.isfinite(value) or value > MAX_SIZE:
        raise MemoptError(f"{option} {text!r}: too large (at most {format_bytes(MAX_SIZE)})")
    if unit in ("", "b") and not number.is_integer():
        raise MemoptError(f"{option} {text!r}: a size without a unit is bytes and must be whole; "
                          f"did you mean {m.group(1)}GiB?")
    if value < 1:
        raise MemoptError(f"{option} {text!r}: must be at least 1 byte")
    return int(value)


def parse_percent(text: str, option: str) -> float:
    """'2%' or '2' -> 0.02; ``option`` names the flag in the error."""
    try:
        value = float(str(text).strip().removesuffix("%"))
    except ValueError:
        raise MemoptError(f"{option} {text!r}: expected a percentage such as 2%") from None
    if not 0 <= value < 1000:
        raise MemoptError(f"{option} {text!r}: must be between 0% and 1000%")
    return value / 100
