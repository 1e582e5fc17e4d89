"""Sizes by QEMU's rules (qemu_strtosz), the one size parser of the project."""
import pytest

from vballoon.errors import ConfigError
from vballoon.units import FRAME, GiB, KiB, MiB, format_size, parse_size


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("0", 0), ("64K", 64 * KiB), ("64k", 64 * KiB), ("512M", 512 * MiB),
    ("8G", 8 * GiB), ("1T", 1 << 40), ("1P", 1 << 50), ("1E", 1 << 60), ("12B", 12),
    ("1.5G", 3 * GiB // 2), ("0.5M", 512 * KiB), ("1.0001K", 1024),   # fractions truncate
    ("0x1000", 4096), ("0x10M", 16 * MiB), (" 2G ", 2 * GiB),
    ("8GiB", 8 * GiB), ("8GB", 8 * GiB), ("8gib", 8 * GiB),
])
def test_sizes_qemu_accepts(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text,why", [
    ("-1G", "negative"), ("-5G", "negative"), ("", "expected a number"),
    ("G", "expected a number"), ("1.5", "fraction of a byte"), ("0.5B", "fraction of a byte"),
    ("0x1.8G", "hexadecimal"), ("nan", "expected a number"), ("inf", "expected a number"),
    ("1Q", "expected a number"), ("1 G", "expected a number"), ("16E", "too large"),
    ("18446744073709551616", "too large"), ("1e3", "expected a number"),
])
def test_sizes_refused_with_reason(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as e:
        parse_size(text)
    assert e.value.rule == "bad-size"


def test_largest_size() -> None:
    assert parse_size("18446744073709551615") == (1 << 64) - 1
    assert parse_size("15.99E") < 1 << 64


def test_format_size() -> None:
    assert format_size(8 * GiB) == "8.00 GiB"
    assert format_size(512 * MiB) == "512.0 MiB"
    assert format_size(FRAME) == "4.0 KiB"
    assert format_size(12) == "12 B"
