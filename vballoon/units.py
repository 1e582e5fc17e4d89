"""Units: the guest's page frame, the host's page, and sizes as people type and read them.

Two page sizes meet in this project and must not be mixed up:

* :data:`FRAME` — the 4 KiB frame a balloon PFN and a bitmap-queue bit count, whatever the
  guest's or host's page size (VIRTIO 1.2 §5.5.6: ``VIRTIO_BALLOON_PFN_SHIFT``; the bitmap
  queue's ``page_shift`` 12).
* :data:`HOST_PAGE` — this host's page size, the unit of ``mmap`` and ``madvise``.

Sizes follow QEMU's rules (``qemu_strtosz``, as ``-m`` and QMP's ``balloon`` read them), so an
operator can paste the same value into both.
"""
from __future__ import annotations

import mmap
import re

from vballoon.errors import ConfigError
from vballoon.wire import C

FRAME_SHIFT = C.VIRTIO_BALLOON_PFN_SHIFT         # 12, and so is the bitmap queue's page_shift
assert FRAME_SHIFT == C.VIRTIO_BALLOON_BITMAP_PAGE_SHIFT
FRAME = 1 << FRAME_SHIFT
HOST_PAGE = mmap.PAGESIZE

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

_SUFFIX_SHIFT = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE = re.compile(r"(?P<int>0[xX][0-9a-fA-F]+|[0-9]+)(?P<frac>\.[0-9]+)?"
                   r"(?:(?P<suffix>[bBkKmMgGtTpPeE])(?:[iI]?[bB])?)?")


def parse_size(text: str) -> int:
    """A size in bytes, by QEMU's rules: ``4096``, ``64K``, ``8G``, ``1.5G``, ``0x1000``.

    Suffixes B, K, M, G, T, P, E (binary units, any case; ``GiB``/``GB`` are read as ``G``);
    no suffix means bytes.  A fraction needs a unit above bytes (``1.5`` and ``0.5B`` are
    refused) and is truncated to whole bytes, as QEMU does.  Negative numbers, hex with a
    fraction, ``nan``, ``inf`` and values of 2^64 or more are refused.
    :raise ConfigError: with rule ``bad-size``.
    """
    t = text.strip()
    m = _SIZE.fullmatch(t)
    if m is None:
        why = "negative sizes are not sizes" if t.startswith("-") else \
            "expected a number with an optional unit: B, K, M, G, T, P, E (e.g. 512M, 1.5G)"
        raise ConfigError("bad-size", f"{text!r}: {why}")
    is_hex = m["int"][:2] in ("0x", "0X")
    value = int(m["int"], 16 if is_hex else 10)
    shift = _SUFFIX_SHIFT[(m["suffix"] or "B").upper()]
    if m["frac"]:
        if is_hex:
            raise ConfigError("bad-size", f"{text!r}: a hexadecimal size has no fraction")
        if shift == 0:
            raise ConfigError("bad-size", f"{text!r}: a fraction of a byte is not a size "
                              "(give a unit: K, M, G, ...)")
        num, den = int(m["frac"][1:]), 10 ** (len(m["frac"]) - 1)
        result = (value << shift) + (num << shift) // den
    else:
        result = value << shift
    if result >= 1 << 64:
        raise ConfigError("bad-size", f"{text!r}: too large (sizes stop below 16 EiB)")
    return result


def format_size(nbytes: float) -> str:
    """``8.00 GiB``, ``512.0 MiB``, ``4.0 KiB``, ``12 B``: binary units, for people."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(nbytes) >= 1 << shift:
            v = nbytes / (1 << shift)
            return f"{v:.2f} {unit}" if shift >= 30 else f"{v:.1f} {unit}"
    return f"{int(nbytes)} B"
