"""A finished round keeps its map as runs (issue 14): every reading method answers exactly as
the bitmaps did; a write expands it back; a checkered map keeps its bitmaps."""
from __future__ import annotations

import numpy as np
import pytest

from vballoon.fpmap import BitmapRounds, FreePageMap, Round, RoundState
from vballoon.sim.scanner import BuddyModel, driver_chunks

GiB = 1 << 30
LAYOUTS = [
    [(0, 64 << 20)],
    [(0, 2 * GiB), (4 * GiB, 2 * GiB)],                       # a PCI hole inside one segment
    [(0, 64 << 20), (16 << 40, 64 << 20)],                    # two segments
    [(0x3000, (8 << 20) + 0x123), ((8 << 20) + 0x10000, 1 << 20)],   # odd edges
]


def answers(m: FreePageMap) -> dict:
    out = {"free_pages": m.free_pages(),
           "covered_pages": m.covered_pages(), "coverage": m.coverage(),
           "ranges": m.ranges().copy(), "count": m.count_ranges(),
           "file": m.file_ranges([(g, s, 7 << 12) for g, s in [(0, 1 << 40)]])}
    if m.nwords < 1 << 20:             # not the dense copies of a 16 TiB span
        out["free"], out["covered"] = m.free.copy(), m.covered.copy()
    mid = m.max_pfn // 3
    out["ranges_in"] = m.ranges_in(mid, 2 * mid + 5).copy()
    out["count_in"] = m.count_ranges(mid, 2 * mid + 5)
    out["page"] = [(p.copy(), c, n) for p, c, n in (m.range_page(0, 5), m.range_page(mid, 3),
                                                     m.range_page(m.max_pfn, 4))]
    out["iter"] = np.concatenate(list(m.iter_ranges(mid, None, batch=7)) or
                                 [np.zeros((0, 2), np.int64)])
    return out


def same(a: dict, b: dict) -> None:
    for k in a:
        if k == "page":
            for (p1, c1, n1), (p2, c2, n2) in zip(a[k], b[k]):
                assert np.array_equal(p1, p2) and c1 == c2 and n1 == n2, k
        elif isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def random_map(layout, rng, *, hints: bool) -> FreePageMap:
    m = FreePageMap(layout)
    for a, b in m.ram:
        for _ in range(20):
            lo = int(rng.integers(a, b))
            n = int(rng.integers(1, max(2, (b - a) // 50)))
            n = min(n, m.max_pfn - lo)
            if hints:
                m.mark_free_range(lo, n)
            else:
                start = lo - lo % 64
                nbits = min(n + lo - start, m.max_pfn - start)
                bits = rng.choice(np.array([0, 0xFF, 0x0F, 0x10], dtype=np.uint8),
                                  -(-nbits // 8), p=[0.45, 0.45, 0.05, 0.05])
                m.or_bitmap(start, bits, nbits)
    return m


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hints", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_a_compacted_map_answers_as_its_bitmaps(layout, hints, seed):
    rng = np.random.default_rng(seed)
    m = random_map(layout, rng, hints=hints)
    if seed % 2:
        m.covered_pages()          # coverage already written into the bitmap
    before = answers(m)
    m.compact(force=True)
    assert m.compacted
    same(before, answers(m))


def test_writing_a_compacted_map_expands_it():
    m = FreePageMap([(0, 64 << 20)])
    m.mark_free_range(100, 50)
    m.compact(force=True)
    assert m.compacted
    m.mark_free_range(1000, 10)
    assert not m.compacted
    assert m.ranges().tolist() == [[100, 50], [1000, 10]] and m.covered_pages() == 60
    m.or_bitmap(2048, b"\xff", 8)
    assert m.free_pages() == 68


def test_a_checkered_map_keeps_its_bitmaps():
    m = FreePageMap([(0, 64 << 20)])
    m.or_bitmap(0, np.full(m.max_pfn // 8, 0x55, dtype=np.uint8))
    m.compact()
    assert not m.compacted and m.free_pages() == m.max_pfn // 2


def test_an_ended_round_is_compacted_and_costs_a_fraction_of_its_bitmap():
    model = BuddyModel.after_workload(16 * GiB, seed=1, layout="flat")
    rounds = BitmapRounds(model.layout)
    rnd = rounds.request(0.0)
    for c in driver_chunks(model, rnd.id):
        rounds.receive(c.buffers(), now=1.0)
    assert rnd.state is RoundState.DONE and rnd.map.compacted
    bitmap = -(-model.max_pfn // 64) * 8
    assert rnd.map.allocated_bytes <= 0.2 * bitmap
    assert np.array_equal(rnd.map.free, model.free_bitmap())
    assert rnd.map.coverage() == 1.0


def test_an_aborted_round_is_compacted_and_a_running_one_is_not():
    rounds = BitmapRounds([(0, 64 << 20)])
    rnd = rounds.request(0.0)
    assert not rnd.map.compacted
    rounds.request(1.0)
    assert rnd.state is RoundState.ABORTED and rnd.map.compacted
    assert rnd.map.free_pages() == 0 and rnd.map.coverage() == 0.0
    assert rnd.map.ranges().shape == (0, 2)


def test_a_hint_round_ends_compacted():
    m = FreePageMap([(0, 64 << 20)])
    r = Round(5, m, 0.0, kind="hint")
    m.mark_free_range(256, 512)
    m.mark_free_range(8192, 64)
    assert r.end(RoundState.DONE, 1.0) and m.compacted
    assert m.ranges().tolist() == [[256, 512], [8192, 64]] and m.covered_pages() == 576
