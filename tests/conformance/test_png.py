"""The map picture (vballoon.picture), read back by a PNG decoder written here from the PNG
specification (chunks, CRC-32, zlib, filter type 0), independent of the writer."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from vballoon.fpmap import FreePageMap
from vballoon.fpmap.picture import CATEGORIES, count_pixels, pages_per_pixel, render_png

MiB = 1 << 20
COLOUR = {name: rgb for name, rgb, _ in CATEGORIES}


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB, non-interlaced PNG as an (h, w, 3) array; every chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body), tag
        chunks.append((tag, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()                       # filter type None on every row
    return rows[:, 1:].reshape(h, w, 3)


@pytest.fixture
def small_map():
    """RAM [0, 1 MiB) and [2 MiB, 3 MiB): pfns 0-255 and 512-767, a hole in between."""
    m = FreePageMap([(0, 1 * MiB), (2 * MiB, 1 * MiB)])
    m.or_bitmap(0, b"\xff" * 4 + b"\x00" * 4, 64)        # 0-31 free, 32-63 covered, not free
    return m


def test_each_category_gets_its_colour_where_its_pages_are(tmp_path, small_map):
    inflated = np.zeros(96, dtype=np.uint8)
    inflated[64] = 0xFF                                  # pfns 512-519 in the balloon
    pic = render_png(small_map, inflated, str(tmp_path / "m.png"), width=64)
    assert pic.pages_per_pixel == 1 and pic.row_bytes == 64 * 4096
    img = decode_png((tmp_path / "m.png").read_bytes())
    assert img.shape == (pic.height, pic.width, 3)
    px = img[pic.top:pic.top + 12, pic.left:pic.left + 64]      # 768 pfns, 64 per row

    def at(pfn):
        return tuple(int(c) for c in px[pfn // 64, pfn % 64])

    assert at(0) == at(31) == COLOUR["free"]
    assert at(32) == at(63) == COLOUR["used"]
    assert at(64) == at(255) == COLOUR["unknown"]
    assert at(256) == at(511) == COLOUR["hole"]
    assert at(512) == at(519) == COLOUR["ballooned"]
    assert at(520) == COLOUR["unknown"]
    assert pic.pages == {"free": 32, "used": 32, "unknown": 440, "ballooned": 8, "hole": 256}


def test_a_pixel_mixes_its_pages_colours_in_proportion(small_map):
    counts = count_pixels(small_map, None, width=64, ppp=4)
    names = [n for n, _, _ in CATEGORIES]
    first = dict(zip(names, counts[:, 0].tolist()))
    assert first == {"free": 4, "used": 0, "unknown": 0, "ballooned": 0, "hole": 0}
    small_map.or_bitmap(64, b"\x05", 4)                  # pfns 64, 66 free; 65, 67 used
    mixed = dict(zip(names, count_pixels(small_map, None, width=64, ppp=4)[:, 16].tolist()))
    assert mixed == {"free": 2, "used": 2, "unknown": 0, "ballooned": 0, "hole": 0}
    assert (counts.sum(axis=0) == 4).all()               # every pixel accounts for 4 pages


def test_a_1_tib_guest_is_one_mib_per_pixel_one_gib_per_row():
    max_pfn = (1 << 28) + (1 << 19)                      # 1 TiB of RAM above a 2 GiB hole
    ppp = pages_per_pixel(max_pfn, 1024)
    assert ppp == 256 and -(-max_pfn // (1024 * ppp)) == 1026


def test_a_1_tib_map_is_drawn_from_its_bitmaps(tmp_path):
    m = FreePageMap([(0, 2 << 30), (4 << 30, (1 << 40) - (2 << 30))])
    m.mark_free_range(1 << 20, 1 << 27)                  # 512 GiB free from 4 GiB
    pic = render_png(m, None, str(tmp_path / "big.png"))
    img = decode_png((tmp_path / "big.png").read_bytes())
    assert (pic.pages_per_pixel, pic.row_bytes) == (256, 1 << 30)
    row = lambda gib: img[pic.top + gib, pic.left + 512]           # noqa: E731
    assert tuple(row(1)) == COLOUR["unknown"] and tuple(row(3)) == COLOUR["hole"]
    assert tuple(row(100)) == COLOUR["free"] and tuple(row(900)) == COLOUR["unknown"]
    assert pic.pages["free"] == 1 << 27


def test_a_ranges_export_cannot_be_drawn(tmp_path):
    class RangesOnly:
        max_pfn, ram, free, covered = 64, ((0, 64),), None, None

    with pytest.raises(ValueError, match="bitmap export"):
        render_png(RangesOnly(), None, str(tmp_path / "x.png"))


def test_an_independent_decoder_reads_the_same_picture(tmp_path, small_map):
    """Pillow (a decoder written elsewhere) reads the file as the one here does."""
    Image = pytest.importorskip("PIL.Image")
    inflated = np.zeros(96, dtype=np.uint8)
    inflated[64] = 0xFF
    path = tmp_path / "m.png"
    render_png(small_map, inflated, str(path), width=64, title="ROUND 1")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        theirs = np.asarray(im.convert("RGB"))
    assert (theirs == decode_png(path.read_bytes())).all()


def test_the_picture_is_written_whole_and_private(tmp_path, small_map):
    path = tmp_path / "m.png"
    path.write_bytes(b"an older file")
    render_png(small_map, None, str(path), width=64)
    assert path.stat().st_mode & 0o777 == 0o600         # a map shows the guest's layout
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]   # no temporary left
