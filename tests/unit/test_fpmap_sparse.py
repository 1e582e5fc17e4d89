"""Issue 10 #10: a round's state is sized by the RAM present, not by the highest pfn; every
answer is the same as a dense map's."""
from __future__ import annotations

import numpy as np
from balloonrig import MiB, Rig
from hypothesis import given, settings, strategies as st

from vballoon.fpmap import FreePageMap
from vballoon.fpmap.map import SEGMENT_GAP_WORDS

TiB = 1 << 40


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_item10_sparse_layout_round_costs_ram_not_span():
    layout = [(0, 32 * MiB), (16 * TiB, 32 * MiB)]
    before = rss()
    with Rig(layout) as rig:
        b = rig.dev.start_round("bitmap")
        h = rig.dev.start_round("hint")
        assert b.map.allocated_bytes < 64 << 10 and h.map.allocated_bytes < 64 << 10
        assert b.map.max_pfn == (16 * TiB + 32 * MiB) // 4096
        h.map.mark_free_range(16 * TiB // 4096 + 10, 20)
        assert h.map.ranges().tolist() == [[16 * TiB // 4096 + 10, 20]]
        assert h.map.count_ranges() == 1 and h.map.free_pages() == 20
        assert rig.dev.inflated.count() == 0
    assert rss() - before < 64 * MiB


def dense_reference(layout, writes):
    end = max(g + s for g, s in layout) // 4096
    ram = np.zeros(end, dtype=bool)
    for g, s in layout:
        ram[-(-g // 4096):(g + s) // 4096] = True
    free = np.zeros(end, dtype=bool)
    cov = np.zeros(end, dtype=bool)
    for start, bits in writes:
        free[start:start + len(bits)] |= bits
        cov[start:start + len(bits)] = True
    return free & ram, cov & ram


def runs(mask):
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return np.stack([starts, ends - starts], axis=1).tolist()


GAP = (SEGMENT_GAP_WORDS + 3) * 64 * 4096          # bytes: a hole that splits the bitmaps


@st.composite
def layouts(draw):
    n = draw(st.integers(1, 3))
    at, out = 0, []
    for _ in range(n):
        at += draw(st.sampled_from([0, 4096 * 64, GAP, 2 * GAP]))
        size = draw(st.integers(1, 64)) * 4096 * 64
        out.append((at, size))
        at += size
    return out


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), data=st.data())
def test_item10_a_segmented_map_answers_as_a_dense_one(layout, data):
    m = FreePageMap(layout)
    writes = []
    for _ in range(data.draw(st.integers(0, 6))):
        start = data.draw(st.integers(0, m.max_pfn - 1))
        n = data.draw(st.integers(0, min(m.max_pfn - start, 1 << 19)))
        bits = np.random.default_rng(start + n).random(n) < 0.5
        m.or_bitmap(start, np.packbits(bits, bitorder="little"), n)
        writes.append((start, bits))
    free, cov = dense_reference(layout, writes)
    assert m.free_pages() == int(free.sum()) and m.covered_pages() == int(cov.sum())
    assert m.ranges().tolist() == runs(free)
    assert m.count_ranges() == len(runs(free))
    f = np.unpackbits(m.free.view(np.uint8), bitorder="little")[:m.max_pfn].astype(bool)
    assert np.array_equal(f, free)
    start = data.draw(st.integers(0, m.max_pfn))
    part, count, nxt = m.range_page(start, 3)
    want = runs(np.concatenate((np.zeros(start, bool), free[start:])))
    assert count == len(want) and part.tolist() == want[:3]
    assert nxt == (None if len(want) <= 3 else want[2][0] + want[2][1])
