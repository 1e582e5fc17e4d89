"""A picture of a guest's physical memory in one free-page round, written as a PNG.

Guest-physical memory reads left to right, top to bottom, from pfn 0 to ``max_pfn``: one row
is ``width`` pixels, one pixel a power-of-two number of pages, chosen so that the picture is
at most about as tall as it is wide (a 1 TiB guest at the default width: 256 pages = 1 MiB per
pixel, 1 GiB per row).  A pixel's colour mixes the colours of its pages' categories in
proportion, so a pixel that is 10 % free is tinted, not hidden by a majority:

- free: the round reported it free;
- in use: the round covered it and did not report it free;
- unknown: RAM the round did not cover (never "free": the correctness contract, ``protocol/bitmap-queue.md`` §7);
- ballooned: in the balloon (the guest gave it to the host);
- hole: not RAM (the PCI hole, the tail of the last row).

Counting is numpy popcounts over the word bitmaps, a band of rows at a time (memory stays a
few MiB whatever the guest's size).  The PNG is written with ``zlib`` and ``struct``; the legend
uses a built-in 5x7 font.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vballoon.units import FRAME as PAGE

CATEGORIES = (                     # name, RGB (ColorBrewer Dark2 + greys), legend label
    ("free", (27, 158, 119), "FREE"),
    ("used", (217, 95, 2), "IN USE"),
    ("unknown", (200, 200, 200), "UNKNOWN (NOT COVERED)"),
    ("ballooned", (117, 112, 179), "BALLOONED"),
    ("hole", (40, 40, 40), "HOLE (NOT RAM)"),
)
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
BAND_WORDS = 1 << 18               # words of each bitmap per band (2 MiB)

# 5x7 glyphs: seven rows, five bits each (bit 4 = leftmost pixel), as 14 hex digits.
_FONT = {
    "A": "0e1111111f1111", "B": "1e11111e11111e", "C": "0e11101010110e", "D": "1c12111111121c",
    "E": "1f10101e10101f", "F": "1f10101e101010", "G": "0e11101711110f", "H": "1111111f111111",
    "I": "0e04040404040e", "J": "0702020202120c", "K": "11121418141211", "L": "1010101010101f",
    "M": "111b1515111111", "N": "11111915131111", "O": "0e11111111110e", "P": "1e11111e101010",
    "Q": "0e11111115120d", "R": "1e11111e141211", "S": "0f10100e01011e", "T": "1f040404040404",
    "U": "1111111111110e", "V": "11111111110a04", "W": "1111111515150a", "X": "11110a040a1111",
    "Y": "1111110a040404", "Z": "1f01020408101f", "0": "0e11131519110e", "1": "040c040404040e",
    "2": "0e11010204081f", "3": "1f02040201110e", "4": "02060a121f0202", "5": "1f101e0101110e",
    "6": "0608101e11110e", "7": "1f010204080808", "8": "0e11110e11110e", "9": "0e11110f01020c",
    " ": "00000000000000", "(": "02040808080402", ")": "08040202020408", ".": "00000000000c0c",
    ",": "000000000c0408", "%": "18190204081303", "=": "00001f001f0000", "-": "0000001f000000",
    "/": "00010204081000", ":": "000c0c000c0c00", "+": "0004041f040400", "?": "0e110102040004",
}
_GLYPHS = {c: np.unpackbits(np.frombuffer(bytes.fromhex(h), dtype=np.uint8))
           .reshape(7, 8)[:, 3:].astype(bool) for c, h in _FONT.items()}
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint8)


@dataclass(frozen=True)
class Picture:
    """What :func:`render_png` drew: the image's size, where the map is in it (its top-left
    pixel is pfn 0), pages per pixel and per row, and pages per category."""

    path: str
    width: int
    height: int
    left: int
    top: int
    pages_per_pixel: int
    row_bytes: int
    pages: dict[str, int]


def size_text(nbytes: int) -> str:
    """``1G``, ``512M``, ``1.5G``: a short binary size for labels."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if nbytes >= 1 << shift:
            v = nbytes / (1 << shift)
            return f"{v:.0f}{unit}" if v == int(v) or v >= 100 else f"{v:.1f}{unit}"
    return f"{nbytes}B"


# -- counting -----------------------------------------------------------------------------------

def _fill(words: np.ndarray, lo: int, hi: int) -> None:
    """Set bits [lo, hi) of a word bitmap."""
    if lo >= hi:
        return
    a, b = lo // 64, (hi - 1) // 64
    first = np.uint64(~0 << (lo % 64) & (1 << 64) - 1)
    last = np.uint64((1 << ((hi - 1) % 64 + 1)) - 1)
    if a == b:
        words[a] |= first & last
        return
    words[a] |= first
    words[a + 1:b] = np.uint64((1 << 64) - 1)
    words[b] |= last


def _per_pixel(words: np.ndarray, ppp: int) -> np.ndarray:
    """Set bits per group of ``ppp`` bits (a power of two) of a word bitmap."""
    b = words.view(np.uint8)
    if ppp >= 8:
        return _POPCOUNT[b].reshape(-1, ppp // 8).sum(axis=1, dtype=np.int64)
    return np.unpackbits(b, bitorder="little").reshape(-1, ppp).sum(axis=1, dtype=np.int64)


def _band(src: np.ndarray | None, w0: int, w1: int) -> np.ndarray:
    out = np.zeros(w1 - w0, dtype=np.uint64)
    if src is not None:
        part = np.asarray(src).view(np.uint64)[w0:w1]
        out[:len(part)] = part
    return out


def _inflated_words(bits: Any) -> np.ndarray | None:
    if bits is None:
        return None
    b = np.asarray(bits)
    if b.dtype == np.uint64:
        return b
    b = np.ascontiguousarray(b, dtype=np.uint8).ravel()
    padded = np.zeros(-(-b.size // 8) * 8, dtype=np.uint8)
    padded[:b.size] = b
    return padded.view("<u8")


def count_pixels(round_map: Any, inflated: Any, width: int, ppp: int) -> np.ndarray:
    """Pages of each category per pixel: an ``(ncat, rows * width)`` int64 array."""
    max_pfn = round_map.max_pfn
    rows = -(-max_pfn // (width * ppp))
    row_words = width * ppp // 64
    free, covered = round_map.free, round_map.covered
    if free is None or covered is None:
        raise ValueError("a picture needs the free and covered bitmaps (a bitmap export)")
    balloon = _inflated_words(inflated)
    counts = np.zeros((len(CATEGORIES), rows * width), dtype=np.int64)
    band_rows = max(1, BAND_WORDS // row_words)
    for r0 in range(0, rows, band_rows):
        r1 = min(rows, r0 + band_rows)
        w0, w1 = r0 * row_words, r1 * row_words
        ram = np.zeros(w1 - w0, dtype=np.uint64)
        for a, b in round_map.ram:
            _fill(ram, max(a, w0 * 64) - w0 * 64, min(b, w1 * 64) - w0 * 64)
        f, c, bl = (_band(x, w0, w1) & ram for x in (free, covered, balloon))
        cats = (f & ~bl, c & ~f & ~bl, ram & ~c & ~bl, bl)
        px = slice(r0 * width, r1 * width)
        for i, words in enumerate(cats):
            counts[i, px] = _per_pixel(words, ppp)
        counts[4, px] = ppp - _per_pixel(ram, ppp)
    return counts


# -- drawing ------------------------------------------------------------------------------------

def _text(canvas: np.ndarray, x: int, y: int, text: str, scale: int,
          colour: Sequence[int] = INK) -> int:
    """Draw ``text`` (upper-cased) with its top-left corner at (x, y); returns the end x."""
    for ch in text.upper():
        g = _GLYPHS.get(ch, _GLYPHS["?"])
        big = np.kron(g, np.ones((scale, scale), dtype=bool))
        h, w = big.shape
        region = canvas[y:y + h, x:x + w]
        region[big[:region.shape[0], :region.shape[1]]] = colour
        x += 6 * scale
    return x


def text_width(text: str, scale: int) -> int:
    return 6 * scale * len(text)


def write_png(path: str, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG (PNG spec: IHDR, one IDAT, IEND; filter 0 on every row)."""
    h, w, _ = rgb.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)
    raw[:, 1:] = rgb.reshape(h, 3 * w)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))
    # Atomically, mode 0600 (a map shows the guest's memory layout): a reader never sees half
    # a picture, and an existing file is replaced whole.
    d, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def pages_per_pixel(max_pfn: int, width: int) -> int:
    """The smallest power of two that keeps the map at most 1.25 x ``width`` rows tall (the
    slack keeps 1 GiB rows for a 1 TiB guest with a PCI hole)."""
    ppp = 1
    while -(-max_pfn // (width * ppp)) > width + width // 4:
        ppp *= 2
    return ppp


def render_png(round_map: Any, inflated_bitmap: Any, path: str, *, width: int = 1024,
               title: str | None = None) -> Picture:
    """Draw ``round_map`` -- a :class:`~vballoon.fpmap.FreePageMap` or a bitmap-format
    :class:`~vballoon.export.ExportedMap` -- as a PNG at ``path``.

    ``inflated_bitmap``: the pages in the balloon (the device's uint8 bitmap, bit p = pfn p, or
    uint64 words), or None.  ``width``: pixels of the map, rounded down to a multiple of 64.
    ``title``: a first line of text (default: none).
    """
    width = max(64, width // 64 * 64)
    ppp = pages_per_pixel(round_map.max_pfn, width)
    counts = count_pixels(round_map, inflated_bitmap, width, ppp)
    rows = counts.shape[1] // width
    palette = np.array([c[1] for c in CATEGORIES], dtype=np.float64)
    rgb = (counts.T @ palette / ppp).round().astype(np.uint8).reshape(rows, width, 3)
    beyond = np.arange(rows * width).reshape(rows, width) * ppp >= round_map.max_pfn
    rgb[beyond] = BACKGROUND                # past max_pfn: not part of the pfn space

    scale = 2 if width >= 512 else 1
    line = 9 * scale + 4
    totals = {name: int(counts[i].sum()) for i, (name, _, _) in enumerate(CATEGORIES)}
    totals["hole"] -= rows * width * ppp - round_map.max_pfn
    row_bytes = width * ppp * PAGE
    label_every = 1 << (2 * line - 1).bit_length()       # rows between address labels
    labels = {r: size_text(r * row_bytes) if r else "0"
              for r in range(0, max(1, rows - 7 * scale + 1), label_every)}
    margin = max(text_width(t, scale) for t in labels.values()) + 10
    ram_pages = sum(b - a for a, b in round_map.ram)
    heading = [title] if title else []
    heading.append(f"1 PIXEL = {ppp} PAGE{'S' if ppp > 1 else ''} ({size_text(ppp * PAGE)}), "
                   f"1 ROW = {size_text(row_bytes)}")
    legend = []
    for name, colour, label in CATEGORIES:
        share = f" {100 * totals[name] / ram_pages:.1f}% OF RAM" if name != "hole" else ""
        legend.append((colour, f"{label}: {size_text(totals[name] * PAGE)}{share}"))
    top = 8 + line * len(heading)
    text_end = max([text_width(t, scale) for t in heading]
                   + [10 * scale + text_width(t, scale) for _, t in legend])
    canvas = np.full((top + rows + 16 + line * len(legend), margin + max(width, text_end) + 8, 3),
                     BACKGROUND, dtype=np.uint8)
    for i, text in enumerate(heading):
        _text(canvas, margin, 8 + line * i, text, scale)
    canvas[top:top + rows, margin:margin + width] = rgb
    for r, label in labels.items():          # guest-physical address of the row's first byte
        _text(canvas, margin - 4 - text_width(label, scale), top + r, label, scale)
        canvas[top + r, margin - 3:margin - 1] = INK
    y = top + rows + 8
    for colour, text in legend:
        canvas[y:y + 7 * scale, margin:margin + 7 * scale] = colour
        _text(canvas, margin + 10 * scale, y, text, scale)
        y += line
    write_png(path, canvas)
    return Picture(path, canvas.shape[1], canvas.shape[0], margin, top, ppp, row_bytes, totals)
