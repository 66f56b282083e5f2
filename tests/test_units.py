"""Sizes and percentages from the command line: every bad value names its option."""

from __future__ import annotations

import pytest

from memopt.core.errors import MemoptError
from memopt.core.units import format_bytes, parse_percent, parse_size


@pytest.mark.parametrize(("text", "expected"), [("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("24GB", 24 * 10**9),
                                                ("2e9", 2 * 10**9), ("1.5KiB", 1536), ("100", 100), ("1e3B", 1000)])
def test_sizes_parse(text, expected):
    assert parse_size(text, "--fits") == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("1e309GiB", "too large"), ("0.5", "must be whole"), ("", "expected a number"), ("0B", "at least 1 byte"),
    ("-1GiB", "expected a number"), ("8 gigs", "expected a number"), ("nan", "expected a number"),
    ("inf", "expected a number"), ("1e30", "too large"),
])
def test_bad_sizes_name_the_option(text, expected):
    with pytest.raises(MemoptError, match=expected) as err:
        parse_size(text, "--fits")
    assert str(err.value).startswith("--fits ")


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "2%%", "", "1000"])
def test_bad_percentages_name_the_option(text):
    with pytest.raises(MemoptError) as err:
        parse_percent(text, "--tolerance")
    assert str(err.value).startswith("--tolerance ")


def test_format_bytes_binary_units():
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(0) == "0 B" and format_bytes(-2048) == "-2.00 KiB"
