"""The reference guest side: buddy model, intended scanner vs the seed's, the driver's chunks."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vballoon.fpmap import BitmapRounds, RoundState, Verdict
from vballoon.fpmap.map import REQUEST
from vballoon.sim.scanner import (MAX_ORDER, BuddyModel, SeedUndefinedBehaviour, Zone, bitmap_set,
                              buddy_blocks, driver_chunks, respond)
from vballoon.wire import C

GiB = 1 << 30


def scan_bits(scan, start, end, bits, nr_bmap):
    """Run a scanner into fresh bitmaps; their concatenated bits as bools."""
    bmaps = [np.zeros((bits + 7) // 8, dtype=np.uint8) for _ in range(nr_bmap)]
    ret = scan(start, end, bmaps, bits, nr_bmap)
    got = np.concatenate([np.unpackbits(b, bitorder="little")[:bits] for b in bmaps])
    return ret, got.astype(bool)


def chunks_bits(model, chunks):
    """What a list of chunks reports, as a bool per pfn."""
    got = np.zeros(model.max_pfn, dtype=bool)
    for c in chunks:
        bits = np.unpackbits(np.frombuffer(b"".join(c.bitmaps), np.uint8), bitorder="little")
        got[c.start_pfn:c.start_pfn + c.nr_pfns] |= bits[:c.nr_pfns].astype(bool)
    return got


@st.composite
def models(draw, max_pages=1500):
    """Small guests: RAM with or without a hole, one or two zones, free runs of any size."""
    n = draw(st.integers(16, max_pages))
    ram = [(0, n)]
    if draw(st.booleans()):
        a = draw(st.integers(1, n - 2))
        ram = [(0, a), (draw(st.integers(a + 1, n - 1)), n)]
    free = np.zeros(n, dtype=bool)
    pfn, state = 0, draw(st.booleans())
    while pfn < n:
        k = draw(st.integers(1, 1200 if state else 40))
        free[pfn:pfn + k] = state
        pfn, state = pfn + k, not state
    for a, b in zip([0] + [hi for _, hi in ram], [lo for lo, _ in ram] + [n]):
        free[a:b] = False                               # nothing free in holes
    z = draw(st.integers(0, n))
    zones = [("DMA32", 0, z), ("Normal", z, n)] if 0 < z < n else None
    return BuddyModel.from_free_mask(free, ram, zones, seed=draw(st.integers(0, 9)))


@st.composite
def windows(draw, model):
    bits = draw(st.sampled_from([8, 16, 64, 96, 128, 256, 1000]))
    nr_bmap = draw(st.integers(1, 4))
    start = draw(st.integers(0, model.max_pfn))
    end = draw(st.integers(start, model.max_pfn + 300))
    return start, end, bits, nr_bmap


# -- the model -------------------------------------------------------------------------------------

def test_buddy_blocks_are_maximal_aligned_powers_of_two():
    pfn, order = buddy_blocks(np.array([3, 1024]), np.array([21, 3077]))
    got = sorted(zip(pfn.tolist(), order.tolist()))
    assert got == [(3, 0), (4, 2), (8, 3), (16, 2), (20, 0),
                   (1024, 10), (2048, 10), (3072, 2), (3076, 0)]


@settings(max_examples=100, deadline=None)
@given(model=models())
def test_free_mask_decomposition_is_canonical(model):
    ends = model.block_pfn + model.block_pages
    assert (model.block_pfn % model.block_pages == 0).all()
    # a buddy allocator merges free buddies: no two same-order buddies are both free blocks
    blocks = set(zip(model.block_pfn.tolist(), model.block_pages.tolist()))
    zone_of = {}
    for z in model.zones:
        for pfn, order, _ in z.blocks():
            zone_of[pfn] = z
    for pfn, n in blocks:
        if n < 1 << (MAX_ORDER - 1) and (pfn ^ n, n) in blocks:
            assert zone_of[pfn] is not zone_of[pfn ^ n]
    assert (ends <= model.max_pfn).all()


def test_model_rejects_what_a_buddy_allocator_never_holds():
    with pytest.raises(ValueError, match="scanner-block"):        # unaligned
        BuddyModel([Zone("Normal", 0, 64, {(2, "Movable"): [6]})], [(0, 64)])
    with pytest.raises(ValueError, match="scanner-block"):        # overlapping
        BuddyModel([Zone("Normal", 0, 64, {(2, "Movable"): [4], (0, "Unmovable"): [5]})],
                   [(0, 64)])
    with pytest.raises(ValueError, match="scanner-block"):        # outside the zone
        BuddyModel([Zone("Normal", 0, 64, {(3, "Movable"): [64]})], [(0, 128)])
    with pytest.raises(ValueError, match="scanner-block"):        # in a hole
        BuddyModel([Zone("Normal", 0, 64, {(0, "Movable"): [20]})], [(0, 16), (32, 64)])
    with pytest.raises(ValueError, match="scanner-zone"):
        Zone("Normal", 0, 64, {(11, "Movable"): [0]})


def test_after_workload_guest_has_the_q35_layout_and_mostly_large_free_blocks():
    model = BuddyModel.after_workload(8 * GiB, seed=3)
    assert model.ram == [(0, 2 * GiB >> 12), (4 * GiB >> 12, 10 * GiB >> 12)]
    assert [(z.name, z.start_pfn, z.end_pfn) for z in model.zones] == [
        ("DMA", 0, 4096), ("DMA32", 4096, 1 << 20), ("Normal", 1 << 20, 10 * GiB >> 12)]
    ram_pages = 8 * GiB >> 12
    assert 0.9 < model.free_pages() / ram_pages < 0.96
    pages_by_order = np.bincount(np.log2(model.block_pages).astype(int), weights=model.block_pages)
    assert len(pages_by_order) == MAX_ORDER and pages_by_order.min() > 0
    assert pages_by_order[8:].sum() > 0.6 * model.free_pages()
    free = model.free_mask()
    assert not free[:256].any() and not free[4096:4096 + 16384].any()   # firmware, kernel
    assert not free[2 * GiB >> 12:4 * GiB >> 12].any()                  # PCI hole
    small = BuddyModel.after_workload(GiB, seed=3)
    assert small.ram == [(0, GiB >> 12)] and len(small.zones) == 2
    flat = BuddyModel.after_workload(8 * GiB, seed=3, layout="flat")
    assert flat.ram == [(0, 8 * GiB >> 12)] and flat.layout == [(0, 8 * GiB)]


def test_bitmap_set_is_linux_bitmap_set():
    for pos in range(0, 20):
        for n in range(0, 30):
            b = np.zeros(8, dtype=np.uint8)
            bitmap_set(b, pos, n)
            want = np.zeros(64, dtype=bool)
            want[pos:pos + n] = True
            assert np.array_equal(np.unpackbits(b, bitorder="little").astype(bool), want)


# -- the intended scanner (lineage §5.1) -----------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_reference_reports_exactly_the_free_pages_of_its_window(data):
    model = data.draw(models())
    start, end, bits, nr_bmap = data.draw(windows(model))
    ret, got = scan_bits(model.get_unused_pages, start, end, bits, nr_bmap)
    e = min(end, start + nr_bmap * bits)
    want = np.zeros(nr_bmap * bits, dtype=bool)
    want[:max(0, min(e, model.max_pfn) - start)] = model.free_mask()[start:e]
    assert np.array_equal(got, want)          # subset of free pages, and every one of them
    assert ret == (1 if end < model.max_pfn else 0)


def test_reference_covers_a_block_that_starts_before_the_window():
    model = BuddyModel([Zone("Normal", 0, 128, {(3, "Movable"): [56]})], [(0, 128)])
    _, got = scan_bits(model.get_unused_pages, 60, 128, 64, 1)
    assert np.flatnonzero(got).tolist() == [0, 1, 2, 3]                 # pfns 60..63
    _, seed = scan_bits(model.seed_get_unused_pages, 60, 128, 64, 1)
    assert not seed.any()                                               # lineage §5.3


@pytest.mark.parametrize("args", [
    (0, 10, None, 64, 1), (0, 10, [], 64, 1), (0, 10, [None], 64, 1),
    (0, 10, [bytearray(8)], 64, 0), (0, 10, [bytearray(8)], 0, 1), (10, 9, [bytearray(8)], 64, 1),
    (0, 10, [bytearray(8)], 64, 2), (0, 10, [bytearray(7)], 64, 1), (0, 10, [bytes(8)], 64, 1),
])
def test_bad_arguments_return_minus_one_in_both_scanners(args):
    model = BuddyModel.from_free_mask(np.ones(256, dtype=bool))
    assert model.get_unused_pages(*args) == -1
    assert model.seed_get_unused_pages(*args) == -1


def test_return_code_says_whether_there_is_more_to_scan():
    model = BuddyModel.from_free_mask(np.arange(256) == 3)
    b = [bytearray(8)]
    assert model.get_unused_pages(0, 255, b, 64, 1) == 1
    assert model.get_unused_pages(0, 256, b, 64, 1) == 0
    assert model.seed_get_unused_pages(0, 255, b, 64, 1) == 1
    assert model.seed_get_unused_pages(0, 300, b, 64, 1) == 0


# -- the seed's bug (lineage §5.2) -----------------------------------------------------------------

def boundary_model():
    """Two 64-pfn bitmaps.  Free: pfn 69 (order 0) and 56..63 (order 3, ends ON the boundary).

    Everything else, pfn 5 included, is in use.
    """
    return BuddyModel([Zone("Normal", 0, 128, {(0, "Movable"): [69], (3, "Movable"): [56]})],
                      [(0, 128)])


def test_seed_marks_a_used_page_free_for_a_block_ending_on_a_bitmap_boundary():
    model = boundary_model()
    free = model.free_mask()
    _, seed = scan_bits(model.seed_get_unused_pages, 0, 128, 64, 2)
    _, ref = scan_bits(model.get_unused_pages, 0, 128, 64, 2)
    # order 0 runs first and takes the fast path: pos = 69 % 64 = 5.  The order-3 block ends
    # at 64 = the boundary, takes the slow path, and sets bit pos of bitmap[0] eight times.
    assert np.flatnonzero(seed).tolist() == [5, 69]
    assert not free[5]                                  # pfn 5 is in use: reported free
    assert not seed[56:64].any()                        # the block's own pages: lost
    assert np.flatnonzero(ref).tolist() == list(range(56, 64)) + [69]
    assert not (ref & ~free).any()


def test_seed_slow_path_before_any_fast_path_reads_an_uninitialised_pos():
    model = BuddyModel([Zone("Normal", 0, 128, {(3, "Movable"): [56]})], [(0, 128)])
    with pytest.raises(SeedUndefinedBehaviour, match="reads pos before any assignment"):
        scan_bits(model.seed_get_unused_pages, 0, 128, 64, 2)
    _, ref = scan_bits(model.get_unused_pages, 0, 128, 64, 2)
    assert np.flatnonzero(ref).tolist() == list(range(56, 64))


def test_seed_takes_the_slow_path_for_a_block_ending_at_the_window_end():
    model = BuddyModel([Zone("Normal", 0, 64, {(0, "Movable"): [1], (3, "Movable"): [56]})],
                       [(0, 64)])
    _, seed = scan_bits(model.seed_get_unused_pages, 0, 64, 64, 1)
    assert np.flatnonzero(seed).tolist() == [1]         # 56..63 lost; the stray bit hit pfn 1


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_seed_differs_from_the_reference_only_where_lineage_section_5_says(data):
    model = data.draw(models())
    start, end, bits, nr_bmap = data.draw(windows(model))
    e = min(end, start + nr_bmap * bits)
    pfn, n = model.block_pfn, model.block_pages
    inside = (pfn >= start) & (pfn < e)
    clipped = np.minimum(pfn + n, e)
    slow = (inside & ((pfn - start) // bits != (clipped - start) // bits)).any()
    early = ((pfn < start) & (pfn + n > start)).any()
    _, ref = scan_bits(model.get_unused_pages, start, end, bits, nr_bmap)
    try:
        _, seed = scan_bits(model.seed_get_unused_pages, start, end, bits, nr_bmap)
    except SeedUndefinedBehaviour:
        assert slow
        return
    extra, missed = seed & ~ref, ref & ~seed
    if extra.any():                          # stray bits: slow path, and only in bitmap[0]
        assert slow and np.flatnonzero(extra).max() < bits
    if missed.any():
        assert slow or early
    if not slow and not early:
        assert np.array_equal(seed, ref)


def test_seed_reports_used_pages_on_realistic_guests_and_the_reference_never_does():
    wrong_seed = wrong_ref = 0
    for seed in range(6):
        model = BuddyModel.after_workload(8 * GiB, seed)
        free = model.free_mask()
        wrong_ref += int((chunks_bits(model, driver_chunks(model, 1)) & ~free).sum())
        try:
            got = chunks_bits(model, driver_chunks(model, 1, scan=model.seed_get_unused_pages))
        except SeedUndefinedBehaviour:
            wrong_seed += 1
            continue
        wrong_seed += int((got & ~free).sum())
    assert wrong_seed > 0 and wrong_ref == 0


# -- the driver's chunks (spec §4.2) ---------------------------------------------------------------

def test_driver_chunks_follow_the_seed_loop_and_end_exactly_at_max_pfn():
    model = BuddyModel.after_workload(40 * GiB, seed=1)       # max_pfn: 42 GiB, > one chunk
    chunks = list(driver_chunks(model, 9))
    pfn_limit = C.VIRTIO_BALLOON_BITMAP_MAX_CHUNK_PFNS
    assert [c.start_pfn for c in chunks] == [0, pfn_limit]
    assert [c.done for c in chunks] == [False, True]
    first, last = chunks
    assert first.nr_pfns == pfn_limit and len(first.bitmaps) == 32
    assert all(len(b) == 32768 for b in first.bitmaps)
    assert last.nr_pfns == model.max_pfn - pfn_limit == (42 - 32) * GiB >> 12
    assert len(last.bitmaps) == 10 and all(len(b) == 32768 for b in last.bitmaps)
    assert all(c.id == 9 and c.start_pfn % 64 == 0 for c in chunks)
    assert np.array_equal(chunks_bits(model, chunks), model.free_mask())


def test_last_bitmap_buffer_is_whole_words_and_nr_pfns_counts_bits():
    model = BuddyModel.from_free_mask(np.ones(1000, dtype=bool))
    (only,) = driver_chunks(model, 1, pfns_per_bmap=256, nr_bmap=4)
    assert only.done and only.nr_pfns == 1000                # the seed would say 1000 // 8 bytes
    assert [len(b) for b in only.bitmaps] == [32, 32, 32, 32]
    (small,) = driver_chunks(BuddyModel.from_free_mask(np.ones(700, dtype=bool)), 1,
                             pfns_per_bmap=512, nr_bmap=2)
    assert [len(b) for b in small.bitmaps] == [64, 24] and small.nr_pfns == 700
    assert small.bitmaps[1][-1] == 0x0F                      # 700 = 512 + 188: 4 bits, then 0


def test_header_carries_the_request_fields():
    model = BuddyModel.from_free_mask(np.ones(128, dtype=bool))
    (c,) = driver_chunks(model, 0x1234, pfns_per_bmap=64, nr_bmap=2)
    assert c.header() == bytes.fromhex("0100" "0c00" "0100" "0000") \
        + (0x1234).to_bytes(8, "little") + (0).to_bytes(8, "little") + (128).to_bytes(8, "little")
    assert c.buffers() == [c.header(), b"\xff" * 8, b"\xff" * 8]


def test_driver_refuses_chunk_sizes_the_protocol_forbids():
    model = BuddyModel.from_free_mask(np.ones(128, dtype=bool))
    for kw in ({"pfns_per_bmap": 100}, {"nr_bmap": 33}, {"nr_bmap": 0}):
        with pytest.raises(ValueError, match="scanner-argument"):
            next(driver_chunks(model, 1, **kw))


def test_respond_refuses_requests_this_guest_cannot_answer():
    model = BuddyModel.from_free_mask(np.ones(128, dtype=bool))
    with pytest.raises(ValueError, match="scanner-request"):
        respond(model, REQUEST.pack(1, 16, 0, 5))
    with pytest.raises(ValueError, match="scanner-request"):
        respond(model, REQUEST.pack(2, 12, 0, 5))


@pytest.mark.parametrize("mem", [GiB, 8 * GiB])
def test_a_round_through_the_device_reproduces_the_guest_free_pages(mem):
    model = BuddyModel.after_workload(mem, seed=7)
    rounds = BitmapRounds(model.layout)
    rnd = rounds.request(0.0)
    verdicts = [rounds.receive(c.buffers(), now=1.0) for c in respond(model, rnd.request)]
    assert verdicts[-1] is Verdict.DONE and set(verdicts[:-1]) <= {Verdict.ACCEPTED}
    assert rnd.state is RoundState.DONE and rnd.map.coverage() == 1.0
    assert np.array_equal(rnd.map.free, model.free_bitmap())
    mask = model.free_mask()
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    assert rnd.map.ranges().tolist() == np.column_stack(
        (edges[0::2], edges[1::2] - edges[0::2])).tolist()
