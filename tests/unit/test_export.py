"""Export files (protocol/export-format.md): the layout, round trips, atomic writes, and every
rule about where a file may be written and what a reader accepts."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from vballoon.fpmap.rounds import HintRound
from vballoon.errors import ConfigError
from vballoon.fpmap.export import (HEADER, MAGIC, ExportFormatError, read_export, write_atomically,
                             write_export)
from vballoon.fpmap import FreePageMap, Round, RoundState
from vballoon.wire import C, ffi

GiB = 1 << 30
LAYOUT = [(0, 2 * GiB), (4 * GiB, 1 * GiB)]     # q35-like: a PCI hole from 2 to 4 GiB


def done_round(rid: int = 7) -> Round:
    m = FreePageMap(LAYOUT)
    m.mark_free_range(100, 50)
    m.mark_free_range(1 << 19, 1)                # the first page past the hole is... a hole
    m.mark_free_range((1 << 20) + 3, 1000)
    m.or_bitmap(0, b"\xff" * 8 + b"\x0f", 72)     # pfns 0-67 free, covering 0-71
    r = Round(rid, m, requested_at=1000.25)
    r.state, r.finished_at = RoundState.DONE, 1000.5
    return r


def files(d) -> list[str]:
    return sorted(os.listdir(d))


# -- the layout -----------------------------------------------------------------------------------

def test_header_layout_is_pinned():
    assert ffi.sizeof("struct vballoon_export_header") == HEADER.size \
        == C.VBALLOON_EXPORT_HEADER_SIZE == 88
    offsets = {f: ffi.offsetof("struct vballoon_export_header", f) for f in (
        "magic", "version", "page_shift", "payload", "round_id", "kind", "state", "flags",
        "nr_extents", "max_pfn", "ram_pages", "covered_pages", "free_pages", "nr_ranges",
        "requested_at_us", "finished_at_us")}
    assert offsets == {"magic": 0, "version": 8, "page_shift": 10, "payload": 12,
                       "round_id": 16, "kind": 24, "state": 25, "flags": 26, "nr_extents": 28,
                       "max_pfn": 32, "ram_pages": 40, "covered_pages": 48, "free_pages": 56,
                       "nr_ranges": 64, "requested_at_us": 72, "finished_at_us": 80}
    assert ffi.sizeof("struct vballoon_export_extent") == 16
    assert ffi.sizeof("struct vballoon_export_range") == 16
    assert MAGIC == b"VBFPMAP\n"


def test_ranges_file_is_header_extents_then_le64_pairs(tmp_path):
    r = done_round()
    res = write_export(r, str(tmp_path), "m.bin", "ranges")
    data = (tmp_path / "m.bin").read_bytes()
    h = HEADER.unpack_from(data)
    assert (h.magic, h.version, h.page_shift, h.round_id) == (C.VBALLOON_EXPORT_MAGIC, 1, 12, 7)
    assert (h.payload, h.kind, h.state) == (C.VBALLOON_EXPORT_PAYLOAD_RANGES,
                                            C.VBALLOON_EXPORT_KIND_BITMAP,
                                            C.VBALLOON_EXPORT_STATE_DONE)
    assert h.flags == C.VBALLOON_EXPORT_F_COMPLETE
    assert (h.nr_extents, h.max_pfn) == (2, (5 * GiB) >> 12)
    assert h.requested_at_us == 1_000_250_000 and h.finished_at_us == 1_000_500_000
    ext = np.frombuffer(data, "<u8", 4, 88).reshape(2, 2).tolist()
    assert ext == [[0, 1 << 19], [1 << 20, 1 << 18]]
    ranges = np.frombuffer(data, "<u8", offset=88 + 32).reshape(-1, 2).tolist()
    assert ranges == [[0, 68], [100, 50], [(1 << 20) + 3, 1000]]
    assert h.nr_ranges == 3 == res.ranges and h.free_pages == 1118
    assert res.bytes == len(data) == 88 + 32 + 48
    assert res.path == os.path.join(str(tmp_path), "m.bin")


# -- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["ranges", "bitmap", "json"])
def test_every_format_round_trips(tmp_path, fmt):
    r = done_round()
    res = write_export(r, str(tmp_path), f"m.{fmt}", fmt)
    m = read_export(res.path)
    assert m.format == fmt and res.format == fmt
    assert (m.round_id, m.kind, m.state, m.complete) == (7, "bitmap", "done", True)
    assert (m.requested_at, m.finished_at) == (1000.25, 1000.5)
    assert m.ram == r.map.ram and m.max_pfn == r.map.max_pfn
    assert (m.ram_pages, m.covered_pages, m.free_pages) == \
        (r.map.ram_pages, r.map.covered_pages(), r.map.free_pages())
    assert m.coverage == r.map.coverage()
    assert np.array_equal(m.ranges, r.map.ranges()) and res.ranges == len(m.ranges)


def test_bitmap_format_carries_free_covered_and_ballooned(tmp_path):
    r = done_round()
    inflated = np.zeros(100, dtype=np.uint8)
    inflated[3] = 0b101                          # pfns 24 and 26 in the balloon
    res = write_export(r, str(tmp_path), "m", "bitmap", ballooned=inflated)
    m = read_export(res.path)
    assert np.array_equal(m.free, r.map.free) and np.array_equal(m.covered, r.map.covered)
    assert np.flatnonzero(np.unpackbits(m.ballooned.view(np.uint8), bitorder="little")) \
        .tolist() == [24, 26]


def test_a_running_hint_round_exports_its_state(tmp_path):
    m = FreePageMap(LAYOUT)
    m.mark_free_range(10, 5)
    r = HintRound(0x80000001, m, requested_at=5.0, state="receiving")
    out = read_export(write_export(r, str(tmp_path), "h", "ranges").path)
    assert (out.kind, out.state, out.complete, out.finished_at) == ("hint", "receiving", False,
                                                                    None)
    assert out.round_id == 0x80000001 and out.ranges.tolist() == [[10, 5]]


def test_an_empty_map_round_trips(tmp_path):
    r = Round(1, FreePageMap(LAYOUT), requested_at=1.0)
    for fmt in ("ranges", "bitmap", "json"):
        m = read_export(write_export(r, str(tmp_path), fmt, fmt).path)
        assert m.ranges.shape == (0, 2) and m.free_pages == 0 and m.state == "requested"


def test_json_format_is_plain_json(tmp_path):
    res = write_export(done_round(), str(tmp_path), "m.json", "json")
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["format"] == "vballoon-free-page-map" and d["version"] == 1
    assert d["ranges"] == [[0, 68], [100, 50], [(1 << 20) + 3, 1000]] and d["range-count"] == 3
    assert d["ram"] == [[0, 1 << 19], [1 << 20, 1 << 18]] and res.ranges == 3


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="export-format"):
        write_export(done_round(), str(tmp_path), "m", "csv")


# -- atomic writes --------------------------------------------------------------------------------

def test_a_file_is_written_with_mode_0600_and_no_temporary_is_left(tmp_path):
    write_export(done_round(), str(tmp_path), "m", "ranges")
    assert files(tmp_path) == ["m"]
    assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "m").write_bytes(b"old")

    def write(f):
        f.write(b"half a fi")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_atomically(str(tmp_path), "m", write)
    assert files(tmp_path) == ["m"] and (tmp_path / "m").read_bytes() == b"old"


def test_a_file_is_replaced_whole(tmp_path):
    (tmp_path / "m").write_bytes(b"x" * 100_000)
    res = write_export(done_round(), str(tmp_path), "m", "ranges")
    assert os.path.getsize(tmp_path / "m") == res.bytes < 100_000


def test_an_existing_subdirectory_may_be_named(tmp_path):
    (tmp_path / "maps" / "vm1").mkdir(parents=True)
    res = write_export(done_round(), str(tmp_path), "maps/vm1/m", "ranges")
    assert res.path == os.path.join(str(tmp_path), "maps/vm1/m") and read_export(res.path)


def test_the_export_directory_itself_may_be_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    write_export(done_round(), str(tmp_path / "link"), "m", "ranges")
    assert files(tmp_path / "real") == ["m"]


# -- where a file may not go ----------------------------------------------------------------------

@pytest.mark.parametrize("name,why", [
    ("/etc/passwd", "absolute"),
    ("/tmp/m", "absolute"),
    ("../m", "'..'"),
    ("a/../../m", "'..'"),
    ("..", "'..'"),
    ("./m", "'..', '.'"),
    ("a//m", "empty path components"),
    ("a/", "empty path components"),
    ("", "empty"),
    ("m\0x", "NUL"),
    ("x" * 201, "longer than"),
])
def test_names_escaping_the_export_directory_are_refused(tmp_path, name, why):
    (tmp_path / "exports" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="export-path") as e:
        write_export(done_round(), str(tmp_path / "exports"), name, "ranges")
    assert why in str(e.value)
    assert files(tmp_path) == ["exports"] and files(tmp_path / "exports") == ["a"]


def test_a_symlinked_directory_in_the_path_is_refused(tmp_path):
    (tmp_path / "exports").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "exports" / "sub")
    with pytest.raises(ConfigError, match="'sub' is a symlink"):
        write_export(done_round(), str(tmp_path / "exports"), "sub/m", "ranges")
    assert files(tmp_path / "elsewhere") == []


def test_a_symlink_deeper_in_the_path_is_refused(tmp_path):
    (tmp_path / "exports" / "a").mkdir(parents=True)
    os.symlink("/", tmp_path / "exports" / "a" / "root")
    with pytest.raises(ConfigError, match="'a/root' is a symlink"):
        write_export(done_round(), str(tmp_path / "exports"), "a/root/tmp/m", "ranges")


def test_a_symlinked_file_is_refused_and_its_target_untouched(tmp_path):
    (tmp_path / "exports").mkdir()
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    os.symlink(target, tmp_path / "exports" / "m")
    with pytest.raises(ConfigError, match="'m' is a symlink"):
        write_export(done_round(), str(tmp_path / "exports"), "m", "ranges")
    assert target.read_bytes() == b"keep" and os.path.islink(tmp_path / "exports" / "m")


def test_a_dangling_symlink_is_refused(tmp_path):
    (tmp_path / "exports").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "exports" / "m")
    with pytest.raises(ConfigError, match="symlink"):
        write_export(done_round(), str(tmp_path / "exports"), "m", "ranges")
    assert not os.path.exists(tmp_path / "nowhere")


def test_a_directory_or_fifo_as_the_target_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "f")
    for name in ("d", "f"):
        with pytest.raises(ConfigError, match="not a regular file"):
            write_export(done_round(), str(tmp_path), name, "ranges")


def test_a_missing_directory_is_refused_not_created(tmp_path):
    with pytest.raises(ConfigError, match="export-path"):
        write_export(done_round(), str(tmp_path), "no/such/m", "ranges")
    assert files(tmp_path) == []
    with pytest.raises(ConfigError, match="export directory"):
        write_export(done_round(), str(tmp_path / "absent"), "m", "ranges")


# -- what a reader refuses ------------------------------------------------------------------------

def _ranges_file(tmp_path) -> bytearray:
    write_export(done_round(), str(tmp_path), "m", "ranges")
    return bytearray((tmp_path / "m").read_bytes())


def _reads(tmp_path, data: bytes):
    p = tmp_path / "bad"
    p.write_bytes(bytes(data))
    return read_export(str(p))


@pytest.mark.parametrize("field,value,match", [
    ("magic", 0, "neither"),
    ("version", 2, "version 2 is not supported"),
    ("page_shift", 16, "page_shift"),
    ("payload", 9, "unknown payload"),
    ("kind", 0, "unknown payload"),
    ("state", 5, "unknown payload"),
    ("flags", 2, "flags"),
    ("flags", 0, "flags"),                       # a DONE round without COMPLETE
    ("free_pages", 1119, "free <= covered|summing"),
    ("covered_pages", 10**9, "page counts"),
    ("nr_ranges", 4, "payload bytes"),
    ("nr_extents", 3, "RAM extents|ram_pages"),
    ("max_pfn", 1, "max_pfn"),
    ("ram_pages", (1 << 19) + (1 << 18) + 1, "ram_pages"),
])
def test_a_reader_refuses_a_header_that_lies(tmp_path, field, value, match):
    data = _ranges_file(tmp_path)
    h = HEADER.unpack_from(data)._replace(**{field: value})
    HEADER.pack_into(data, 0, *h)
    with pytest.raises(ExportFormatError, match=match):
        _reads(tmp_path, data)


def test_a_reader_refuses_a_truncated_file(tmp_path):
    data = _ranges_file(tmp_path)
    for n in (0, 8, 87, 100, len(data) - 1):
        with pytest.raises(ExportFormatError):
            _reads(tmp_path, data[:n])


def test_a_reader_refuses_unsorted_or_overlapping_ranges(tmp_path):
    data = _ranges_file(tmp_path)
    r = np.frombuffer(data, "<u8", offset=120).reshape(-1, 2).copy()
    for bad in (r[[1, 0, 2]], np.array([[0, 101], [100, 50], r[2]])):
        data[120:] = bad.astype("<u8").tobytes()
        with pytest.raises(ExportFormatError, match="ascending"):
            _reads(tmp_path, data)


def test_a_reader_refuses_a_bitmap_whose_ranges_disagree(tmp_path):
    write_export(done_round(), str(tmp_path), "m", "bitmap")
    data = bytearray((tmp_path / "m").read_bytes())
    data[120 + 20] |= 1                           # one more free page, uncounted
    with pytest.raises(ExportFormatError):
        _reads(tmp_path, data)


def test_a_reader_refuses_malformed_json(tmp_path):
    write_export(done_round(), str(tmp_path), "m", "json")
    d = json.loads((tmp_path / "m").read_text())
    for change in ({"version": 2}, {"range-count": 9}, {"ranges": [[5, 1], [0, 1]]},
                   {"format": "other"}, {"ram": "x"}):
        with pytest.raises(ExportFormatError):
            _reads(tmp_path, json.dumps({**d, **change}).encode())
    with pytest.raises(ExportFormatError):
        _reads(tmp_path, b"{not json")


def test_a_reader_refuses_a_range_that_wraps_past_2_63(tmp_path):
    data = _ranges_file(tmp_path)
    data[120 + 32:120 + 48] = np.array([(1 << 63) - 10, 1000], dtype="<u8").tobytes()
    with pytest.raises(ExportFormatError, match="ascending"):
        _reads(tmp_path, data)


@pytest.mark.parametrize("which,pfn,match", [
    (0, 80, "not covered"),                       # free but not covered
    (1, 300_000 + (1 << 19), "not RAM"),          # covered, in the PCI hole
    (1, 80, "covered_pages"),                     # covered, RAM, but not counted
])
def test_a_reader_refuses_bitmaps_that_break_the_map_rules(tmp_path, which, pfn, match):
    write_export(done_round(), str(tmp_path), "m", "bitmap")
    data = bytearray((tmp_path / "m").read_bytes())
    nwords = -(-HEADER.unpack_from(data).max_pfn // 64)
    at = 120 + which * 8 * nwords + pfn // 8
    data[at] |= 1 << (pfn % 8)
    with pytest.raises(ExportFormatError, match=match):
        _reads(tmp_path, data)


def test_item15_a_lone_surrogate_file_name_is_refused_cleanly(tmp_path):
    from vballoon.fpmap.export import open_target
    with pytest.raises(ConfigError, match="export-path.*lone surrogate"):
        open_target(str(tmp_path), "map-\ud800.vbmap")
