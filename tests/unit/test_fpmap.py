"""The free-page map and the device side of the bitmap queue (protocol/bitmap-queue.md)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vballoon.fpmap import map as fpmap
from vballoon.fpmap._fastbits import ffi, lib
from vballoon.fpmap import BitmapRounds, FreePageMap, RoundState, Verdict
from vballoon.fpmap.map import CHUNK_HEADER, REQUEST
from vballoon.wire import C, ffi as wire_ffi

GiB = 1 << 30
X86_4G = [(0, 2 * GiB), (4 * GiB, 2 * GiB)]        # q35: RAM below 2 GiB, the rest from 4 GiB


def bits_of(words: np.ndarray, n: int) -> np.ndarray:
    """A map's bitmap as one bool per pfn (wire order: byte k/8, bit k%8)."""
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:n].astype(bool)


def ram_mask(fpm: FreePageMap) -> np.ndarray:
    m = np.zeros(fpm.max_pfn, dtype=bool)
    for a, b in fpm.ram:
        m[a:b] = True
    return m


def naive_ranges(mask: np.ndarray, lo: int = 0) -> list[tuple[int, int]]:
    out, start = [], None
    for i, v in enumerate(mask.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((lo + start, i - start))
            start = None
    return out


# -- the wire layouts (spec §3) --------------------------------------------------------------------

def test_request_is_16_bytes_cmd_page_shift_reserved_id():
    assert wire_ffi.sizeof("struct virtio_balloon_bitmap_req") == 16 \
        == C.VIRTIO_BALLOON_BITMAP_REQ_SIZE
    assert REQUEST.offsets == {"cmd": 0, "page_shift": 2, "reserved": 4, "id": 8}
    assert REQUEST.struct.format == "<HHIQ"


def test_chunk_header_is_32_bytes_in_the_seed_field_order():
    assert wire_ffi.sizeof("struct virtio_balloon_bitmap_chunk") == 32 \
        == C.VIRTIO_BALLOON_BITMAP_CHUNK_HDR_SIZE
    assert CHUNK_HEADER.offsets == {"cmd": 0, "page_shift": 2, "flags": 4, "reserved": 6,
                                    "id": 8, "start_pfn": 16, "nr_pfns": 24}
    assert CHUNK_HEADER.pack(1, 12, 1, 0, 2, 64, 3) == bytes.fromhex(
        "0100" "0c00" "0100" "0000" "0200000000000000" "4000000000000000" "0300000000000000")


def test_feature_bit_collides_with_no_assigned_or_proposed_bit():
    bit = C.VIRTIO_BALLOON_F_FREE_PAGE_BITMAP
    assert bit == 16 and bit not in range(0, 9) and bit < 24     # device-specific range 0-23


def test_sizes_are_the_seed_defaults():
    assert C.VIRTIO_BALLOON_BITMAP_PFNS_PER_BMAP == 262144 == C.VIRTIO_BALLOON_BITMAP_BMAP_BYTES * 8
    assert C.VIRTIO_BALLOON_BITMAP_MAX_BMAPS == 32
    assert C.VIRTIO_BALLOON_BITMAP_MAX_CHUNK_PFNS == 262144 * 32


# -- the map ---------------------------------------------------------------------------------------

def test_x86_layout_has_the_pci_hole_in_its_pfn_space():
    fpm = FreePageMap(X86_4G)
    assert fpm.max_pfn == 6 * GiB >> 12
    assert fpm.ram_pages == 4 * GiB >> 12
    assert fpm.ram == ((0, 2 * GiB >> 12), (4 * GiB >> 12, 6 * GiB >> 12))
    assert fpm.free.nbytes == fpm.covered.nbytes == fpm.max_pfn // 8


def test_or_bitmap_at_a_word_aligned_pfn_sets_exactly_its_bits():
    fpm = FreePageMap([(0, 1 << 25)])
    src = np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8)
    fpm.or_bitmap(640, src)
    want = np.zeros(fpm.max_pfn, dtype=bool)
    want[640:640 + 4096] = np.unpackbits(src, bitorder="little").astype(bool)
    assert np.array_equal(bits_of(fpm.free, fpm.max_pfn), want)
    assert fpm.covered_pages() == 4096


def test_or_bitmap_keeps_bits_already_set():
    fpm = FreePageMap([(0, 1 << 20)])
    fpm.or_bitmap(0, b"\x0f")
    fpm.or_bitmap(0, b"\xf0")
    fpm.or_bitmap(0, b"\x00")
    assert fpm.ranges().tolist() == [[0, 8]]


def test_or_bitmap_ignores_bits_past_nbits():
    fpm = FreePageMap([(0, 1 << 20)])
    fpm.or_bitmap(64, b"\xff\xff", nbits=11)
    assert fpm.ranges().tolist() == [[64, 11]]
    assert fpm.covered_pages() == 11


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 700), data=st.binary(min_size=0, max_size=40),
       cut=st.integers(0, 320), hole=st.booleans())
def test_or_bitmap_at_any_offset_matches_a_naive_or(start, data, cut, hole):
    layout = [(0, 300 << 12), (400 << 12, 700 << 12)] if hole else [(0, 1100 << 12)]
    fpm = FreePageMap(layout)
    nbits = min(cut, len(data) * 8, fpm.max_pfn - start)
    fpm.or_bitmap(0, b"\x11" * 8)                   # something already there
    before = bits_of(fpm.free, fpm.max_pfn).copy()
    fpm.or_bitmap(start, data, nbits)
    want = before.copy()
    want[start:start + nbits] |= np.unpackbits(np.frombuffer(data, np.uint8),
                                               bitorder="little")[:nbits].astype(bool)
    want &= ram_mask(fpm)
    assert np.array_equal(bits_of(fpm.free, fpm.max_pfn), want)
    covered = np.zeros(fpm.max_pfn, dtype=bool)
    covered[:64] = covered[start:start + nbits] = True
    assert np.array_equal(bits_of(fpm.covered, fpm.max_pfn), covered & ram_mask(fpm))


def test_or_pieces_concatenates_pieces_of_any_length():
    fpm, one = FreePageMap([(0, 1 << 22)]), FreePageMap([(0, 1 << 22)])
    src = np.random.default_rng(2).integers(0, 256, 100, dtype=np.uint8).tobytes()
    fpm.or_pieces(128, [src[:3], src[3:10], b"", src[10:]], 790)
    one.or_bitmap(128, src, 790)
    assert np.array_equal(fpm.free, one.free) and np.array_equal(fpm.covered, one.covered)


def test_holes_never_become_free_nor_covered():
    fpm = FreePageMap(X86_4G)
    ones = b"\xff" * (fpm.max_pfn // 8)
    fpm.or_bitmap(0, ones)
    assert fpm.free_pages() == fpm.ram_pages
    assert fpm.coverage() == 1.0
    assert fpm.ranges().tolist() == [[0, 2 * GiB >> 12], [4 * GiB >> 12, 2 * GiB >> 12]]
    hole = slice(2 * GiB >> 12, 4 * GiB >> 12)
    assert not bits_of(fpm.free, fpm.max_pfn)[hole].any()
    assert not bits_of(fpm.covered, fpm.max_pfn)[hole].any()


def test_mark_free_range_across_a_hole_marks_only_ram():
    fpm = FreePageMap(X86_4G)
    fpm.mark_free_range((2 * GiB >> 12) - 3, 10 + (2 * GiB >> 12))
    assert fpm.ranges().tolist() == [[(2 * GiB >> 12) - 3, 3], [4 * GiB >> 12, 7]]
    assert fpm.covered_pages() == 10


def test_pages_partly_outside_a_region_are_holes():
    fpm = FreePageMap([(100, 3 * 4096), (5 * 4096, 4096 + 10)])
    assert fpm.ram == ((1, 3), (5, 6)) and fpm.max_pfn == 6 and fpm.ram_pages == 3
    fpm.or_bitmap(0, b"\xff", nbits=6)
    assert fpm.ranges().tolist() == [[1, 2], [5, 1]]


def test_coverage_is_covered_ram_pages_over_ram_pages():
    fpm = FreePageMap(X86_4G)
    assert fpm.coverage() == 0.0
    fpm.or_bitmap(0, bytes(GiB >> 15))             # 1 GiB of pfns, none free
    assert fpm.coverage() == 0.25 and fpm.free_pages() == 0


def test_coverage_is_exact_after_more_hints_than_the_backlog_holds():
    fpm = FreePageMap([(0, 1 << 30)])
    for pfn in range(0, 3 * fpmap.COVER_BACKLOG * 16, 16):
        fpm.mark_free_range(pfn, 8)                 # 3 x COVER_BACKLOG disjoint intervals
    fpm.mark_free_range(4, 12)                      # overlaps two of them
    assert fpm.covered_pages() == fpm.free_pages() == 3 * fpmap.COVER_BACKLOG * 8 + 8
    assert len(fpm.ranges()) == 3 * fpmap.COVER_BACKLOG - 1


@st.composite
def maps(draw):
    n = draw(st.integers(1, 900))
    fpm = FreePageMap([(0, n << 12)])
    runs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 130)), max_size=12))
    for a, k in runs:
        fpm.mark_free_range(a, min(k, n - a))
    return fpm


@settings(max_examples=200, deadline=None)
@given(fpm=maps(), data=st.data())
def test_ranges_match_a_naive_scan(fpm, data):
    mask = bits_of(fpm.free, fpm.max_pfn)
    assert fpm.ranges().tolist() == [list(r) for r in naive_ranges(mask)]
    lo = data.draw(st.integers(0, fpm.max_pfn))
    hi = data.draw(st.integers(lo, fpm.max_pfn))
    want = [list(r) for r in naive_ranges(mask[lo:hi], lo)]
    assert fpm.ranges_in(lo, hi).tolist() == want
    batch = data.draw(st.integers(1, 4))
    got = [r for part in fpm.iter_ranges(lo, hi, batch=batch) for r in part.tolist()]
    assert got == want
    assert all(len(p) <= batch for p in fpm.iter_ranges(lo, hi, batch=batch))


def test_ranges_of_empty_and_full_maps():
    fpm = FreePageMap([(0, 1000 << 12)])
    assert fpm.ranges().shape == (0, 2) and fpm.ranges().dtype == np.int64
    fpm.mark_free_range(0, 1000)
    assert fpm.ranges().tolist() == [[0, 1000]]
    assert fpm.ranges_in(64, 128).tolist() == [[64, 64]]
    assert fpm.ranges_in(5, 5).tolist() == []


def test_file_ranges_split_at_region_edges():
    fpm = FreePageMap([(0, 8 << 12), (8 << 12, 8 << 12), (32 << 12, 8 << 12)])
    fpm.mark_free_range(4, 8)           # crosses from region 0 into region 1
    fpm.mark_free_range(34, 2)
    regions = [(32 << 12, 8 << 12, 0x100000),       # any order; the index is the position
               (0, 8 << 12, 0x200000), (8 << 12, 8 << 12, 0)]
    assert fpm.file_ranges(regions).tolist() == [
        [1, 0x200000 + (4 << 12), 4 << 12],
        [2, 0, 4 << 12],
        [0, 0x100000 + (2 << 12), 2 << 12]]


def test_file_ranges_leave_out_parts_no_region_holds():
    fpm = FreePageMap([(0, 16 << 12)])
    fpm.mark_free_range(2, 12)
    assert fpm.file_ranges([(4 << 12, 4 << 12, 0)]).tolist() == [[0, 0, 4 << 12]]
    assert fpm.file_ranges([]).shape == (0, 3)


BAD_ARGUMENTS = [
    (lambda: FreePageMap([]), "fpmap-layout"),
    (lambda: FreePageMap([(0, 0)]), "fpmap-layout"),
    (lambda: FreePageMap([(0, 8192), (4096, 8192)]), "fpmap-layout"),
    (lambda: FreePageMap([(0, 100)]), "fpmap-layout"),
    (lambda: FreePageMap([(-4096, 8192)]), "fpmap-argument"),
    (lambda: FreePageMap([((1 << 64) - 4096, 8192)]), "fpmap-layout"),
    (lambda: FreePageMap([(1 << 50, 4096)]), "fpmap-layout"),
    (lambda: FreePageMap([(0, 1 << 20)]).or_bitmap(250, b"\xff"), "fpmap-range"),
    (lambda: FreePageMap([(0, 1 << 20)]).or_bitmap(0, b"\xff", nbits=9), "fpmap-short-buffer"),
    (lambda: FreePageMap([(0, 1 << 20)]).or_bitmap(-8, b"\xff"), "fpmap-argument"),
    (lambda: FreePageMap([(0, 1 << 20)]).or_bitmap(0, [255]), "fpmap-buffer"),
    (lambda: FreePageMap([(0, 1 << 20)]).or_bitmap(0, np.zeros((4, 4), np.uint8)[:, 0]),
     "fpmap-buffer"),
    (lambda: FreePageMap([(0, 1 << 20)]).mark_free_range(255, 2), "fpmap-range"),
    (lambda: FreePageMap([(0, 1 << 20)]).mark_free_range(1, 1 << 64), "fpmap-range"),
    (lambda: FreePageMap([(0, 1 << 20)]).ranges_in(10, 5), "fpmap-window"),
    (lambda: FreePageMap([(0, 1 << 20)]).ranges_in(0, 257), "fpmap-window"),
    (lambda: list(FreePageMap([(0, 1 << 20)]).iter_ranges(batch=0)), "fpmap-argument"),
    (lambda: FreePageMap([(0, 1 << 20)]).file_ranges([(0, 8192, 0), (4096, 8192, 0)]),
     "fpmap-regions"),
    (lambda: FreePageMap([(0, 1 << 20)]).file_ranges([(0, 8192, (1 << 63) - 4096)]),
     "fpmap-regions"),
    (lambda: BitmapRounds([(0, 1 << 20)], first_id=0), "fpmap-argument"),
    (lambda: BitmapRounds([]), "fpmap-layout"),
    (lambda: BitmapRounds([(0, 1 << 20)]).set_layout([(0, 8192), (0, 4096)], now=0.0),
     "fpmap-layout"),
]


@pytest.mark.parametrize("call, rule", BAD_ARGUMENTS, ids=[r for _, r in BAD_ARGUMENTS])
def test_bad_arguments_raise_value_error_naming_the_rule(call, rule):
    with pytest.raises(ValueError, match=rule):
        call()


# -- the C kernel is bounds-safe on its own --------------------------------------------------------

def test_kernel_refuses_windows_past_the_map_and_touches_nothing():
    words = np.zeros(2, dtype=np.uint64)
    p = ffi.from_buffer("uint64_t[]", words)
    src = ffi.from_buffer("uint8_t[]", b"\xff" * 64)
    spans = ffi.new("uint8_t *[]", [src, src])

    def fb_or(lens, bit, nbits):
        return lib.fb_or(p, 2, spans, ffi.new("size_t[]", lens), len(lens), bit, nbits)

    assert fb_or([64], 120, 9) == -1
    assert fb_or([1], 0, 9) == -1                       # the spans are one byte short
    assert fb_or([1, 0], 0, 9) == -1
    assert fb_or([64], (1 << 64) - 1, 2) == -1          # bit + nbits overflows
    assert lib.fb_fill(p, 2, 0, 129, 1) == -1
    assert lib.fb_fill(p, 2, 5, 4, 1) == -1
    assert lib.fb_popcount(p, 2, 0, 129) == -1
    assert lib.fb_runs(p, 2, 0, 129, ffi.NULL, 0, ffi.new("uint64_t *")) == -1
    assert lib.fb_runs(p, 2, 0, 128, ffi.NULL, 1, ffi.new("uint64_t *")) == -1
    assert not words.any()
    assert fb_or([1, 1], 3, 9) == 0                     # 8 bits from span 0, 1 from span 1
    assert words[0] == 0x1FF << 3


def test_kernel_runs_writes_at_most_cap_and_says_where_to_resume():
    words = np.array([0x0F0F, 0], dtype=np.uint64)        # runs at 0 and 8, 4 bits each
    p = ffi.from_buffer("uint64_t[]", words)
    out = np.full(6, 0xDEAD, dtype=np.uint64)             # room for 3 pairs; cap says 1
    nxt = ffi.new("uint64_t *")
    assert lib.fb_runs(p, 2, 0, 128, ffi.from_buffer("uint64_t[]", out), 1, nxt) == 1
    assert out.tolist() == [0, 4] + [0xDEAD] * 4 and nxt[0] == 8
    assert lib.fb_runs(p, 2, nxt[0], 128, ffi.from_buffer("uint64_t[]", out), 1, nxt) == 1
    assert out[:2].tolist() == [8, 4] and nxt[0] == 128


# -- the round protocol (spec §5, §6) --------------------------------------------------------------

LAYOUT = [(0, 64 << 20)]          # 16384 pfns
MAX_PFN = 16384


def chunk(rid, start=0, nr=128, flags=0, bitmap=None, *, cmd=1, shift=12):
    if bitmap is None:
        bitmap = b"\xff" * ((nr + 63) // 64 * 8)
    return [CHUNK_HEADER.pack(cmd, shift, flags, 0, rid, start, nr), bitmap]


def test_request_bytes_carry_cmd_page_shift_and_a_fresh_nonzero_id():
    rounds = BitmapRounds(LAYOUT)
    assert rounds.state is RoundState.IDLE
    r1, r2 = rounds.request(0.0), rounds.request(1.0)
    assert REQUEST.unpack(r1.request) == (1, 12, 0, 1)
    assert r2.id == 2 and r2.state is RoundState.REQUESTED


def test_round_goes_requested_receiving_done():
    rounds = BitmapRounds(LAYOUT)
    rnd = rounds.request(10.0)
    assert rounds.receive(chunk(rnd.id, 0, 128), now=11.0) is Verdict.ACCEPTED
    assert rnd.state is RoundState.RECEIVING and not rnd.complete
    assert rounds.receive(chunk(rnd.id, 128, MAX_PFN - 128, fpmap.F_DONE), now=12.0) is Verdict.DONE
    assert rnd.state is RoundState.DONE and rnd.complete and rnd.finished_at == 12.0
    assert rnd.chunks == 2 and rnd.map.coverage() == 1.0 and rnd.map.free_pages() == MAX_PFN


def test_a_single_done_chunk_completes_a_round():
    rounds = BitmapRounds(LAYOUT)
    rnd = rounds.request(0.0)
    assert rounds.receive(chunk(rnd.id, 0, 0, fpmap.F_DONE, b""), now=1.0) is Verdict.DONE
    assert rnd.complete and rnd.map.coverage() == 0.0


def test_chunks_after_done_are_dropped():
    rounds = BitmapRounds(LAYOUT)
    rnd = rounds.request(0.0)
    rounds.receive(chunk(rnd.id, 0, 64, fpmap.F_DONE), now=1.0)
    assert rounds.receive(chunk(rnd.id, 64, 64), now=2.0) is Verdict.ROUND_CLOSED
    assert rounds.receive(chunk(rnd.id, 64, 64, fpmap.F_DONE), now=2.0) is Verdict.ROUND_CLOSED
    assert rnd.map.free_pages() == 64 and rnd.dropped[Verdict.ROUND_CLOSED] == 2


def test_done_without_a_request_is_dropped():
    rounds = BitmapRounds(LAYOUT)
    assert rounds.receive(chunk(1, 0, 64, fpmap.F_DONE), now=0.0) is Verdict.NO_ROUND
    assert rounds.state is RoundState.IDLE and rounds.dropped[Verdict.NO_ROUND] == 1


def test_a_new_request_aborts_the_round_and_its_chunks_become_stale():
    rounds = BitmapRounds(LAYOUT)
    old = rounds.request(0.0)
    rounds.receive(chunk(old.id, 0, 128), now=1.0)
    new = rounds.request(2.0)
    assert old.state is RoundState.ABORTED and old.abort_reason == "superseded"
    assert old.map.free_pages() == 128 and old.map.coverage() == 128 / MAX_PFN   # kept
    assert rounds.receive(chunk(old.id, 128, 64), now=3.0) is Verdict.STALE_ID
    assert new.map.free_pages() == 0 and old.map.free_pages() == 128


def test_ids_never_issued_are_unknown():
    rounds = BitmapRounds(LAYOUT, first_id=7)
    rnd = rounds.request(0.0)
    assert rounds.receive(chunk(rnd.id + 1, 0, 64), now=0.0) is Verdict.UNKNOWN_ID
    assert rounds.receive(chunk(0, 0, 64), now=0.0) is Verdict.UNKNOWN_ID
    assert rounds.receive(chunk(3, 0, 64), now=0.0) is Verdict.UNKNOWN_ID
    assert rnd.map.covered_pages() == 0 and rnd.dropped.total() == 0
    rounds.request(1.0)
    assert rounds.receive(chunk(rnd.id, 0, 64), now=2.0) is Verdict.STALE_ID


def test_idle_round_times_out_and_keeps_its_coverage():
    rounds = BitmapRounds(LAYOUT, idle_timeout=5.0)
    rnd = rounds.request(0.0)
    rounds.receive(chunk(rnd.id, 0, 64), now=4.0)
    assert not rounds.expire(8.9) and rnd.active
    assert rounds.expire(9.0)
    assert rnd.state is RoundState.ABORTED and rnd.abort_reason == "timeout"
    assert rnd.map.free_pages() == 64
    assert rounds.receive(chunk(rnd.id, 64, 64), now=9.5) is Verdict.ROUND_CLOSED


def test_memory_change_aborts_the_round_and_the_next_uses_the_new_layout():
    rounds = BitmapRounds(LAYOUT)
    rnd = rounds.request(0.0)
    rounds.set_layout([(0, 128 << 20)], now=1.0)
    assert rnd.state is RoundState.ABORTED and rnd.abort_reason == "memory-changed"
    assert rounds.request(2.0).map.max_pfn == 2 * MAX_PFN


MALFORMED = [
    (lambda r: chunk(r, shift=16), Verdict.PAGE_SHIFT),
    (lambda r: chunk(r, start=32), Verdict.UNALIGNED),
    (lambda r: chunk(r, nr=fpmap.MAX_CHUNK_PFNS + 64), Verdict.TOO_LONG),
    (lambda r: chunk(r, start=MAX_PFN - 64, nr=128), Verdict.OUT_OF_RANGE),
    (lambda r: chunk(r, start=MAX_PFN, nr=64), Verdict.OUT_OF_RANGE),
    (lambda r: chunk(r, start=(1 << 64) - 64, nr=128, bitmap=b"\xff" * 16), Verdict.OUT_OF_RANGE),
    (lambda r: chunk(r, nr=128, bitmap=b"\xff" * 15), Verdict.LENGTH),
    (lambda r: chunk(r, nr=128, bitmap=b"\xff" * 17), Verdict.LENGTH),
    (lambda r: chunk(r, nr=65, bitmap=b"\xff" * 9), Verdict.LENGTH),
    (lambda r: chunk(r, cmd=0), Verdict.BAD_CMD),
    (lambda r: chunk(r, flags=2), Verdict.BAD_FLAGS),
    (lambda r: [chunk(r)[0][:31]], Verdict.SHORT_HEADER),
    (lambda r: [], Verdict.SHORT_HEADER),
]


@pytest.mark.parametrize("make, verdict", MALFORMED, ids=[v.value for _, v in MALFORMED])
def test_malformed_chunks_are_dropped_and_change_nothing(make, verdict):
    rounds = BitmapRounds(LAYOUT)
    rnd = rounds.request(0.0)
    assert rounds.receive(make(rnd.id), now=1.0) is verdict
    assert rnd.state is RoundState.REQUESTED and rnd.chunks == 0
    assert not rnd.map.free.any() and not rnd.map.covered.any()
    assert rounds.dropped[verdict] == 1


def test_a_chunk_with_a_writable_descriptor_is_dropped():
    rounds = BitmapRounds(LAYOUT)
    rnd = rounds.request(0.0)
    assert rounds.receive(chunk(rnd.id), writable_len=16, now=1.0) is Verdict.WRITABLE
    assert not rnd.map.covered.any()


def test_a_dropped_done_does_not_end_the_round():
    rounds = BitmapRounds(LAYOUT)
    rnd = rounds.request(0.0)
    assert rounds.receive(chunk(rnd.id, 0, 64, fpmap.F_DONE, b"\xff"), now=1.0) is Verdict.LENGTH
    assert rnd.active and rnd.dropped[Verdict.LENGTH] == 1


def test_bits_past_nr_pfns_and_in_holes_are_ignored():
    rounds = BitmapRounds([(0, 64 << 12), (128 << 12, 128 << 12)])
    rnd = rounds.request(0.0)
    assert rounds.receive(chunk(rnd.id, 0, 130, bitmap=b"\xff" * 24), now=1.0) is Verdict.ACCEPTED
    assert rnd.map.ranges().tolist() == [[0, 64], [128, 2]]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_descriptor_arrangement_does_not_matter(data):
    rounds = BitmapRounds(LAYOUT)
    rnd = rounds.request(0.0)
    nr = data.draw(st.integers(0, 300))
    bitmap = data.draw(st.binary(min_size=(nr + 63) // 64 * 8, max_size=(nr + 63) // 64 * 8))
    start = 64 * data.draw(st.integers(0, 10))
    stream = b"".join(chunk(rnd.id, start, nr, bitmap=bitmap))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    assert rounds.receive([memoryview(p) for p in pieces], now=1.0) is Verdict.ACCEPTED
    want = FreePageMap(LAYOUT)
    want.or_bitmap(start, bitmap, nr)
    assert np.array_equal(rnd.map.free, want.free)
    assert np.array_equal(rnd.map.covered, want.covered)
