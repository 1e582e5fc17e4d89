"""The free-page map of one round (a bitmap-queue round or a free page hint round).

The protocol is ``protocol/bitmap-queue.md`` ("the spec"; § numbers below are its sections),
the wire structs ``protocol/bitmap_queue.h``.  It is Liang Li's 2016 v3 scatter/gather bitmap
(balloon-lineage: the seed), modernised.

:class:`FreePageMap` is the map itself: two bitmaps over the guest's pfn space ``[0, max_pfn)``
(4 KiB frames, holes included) — ``free`` (the guest said the page was free during the round)
and ``covered`` (the round said something about the page).  Bit *k* is bit ``k % 64`` of
little-endian word ``k // 64``, i.e. byte ``k // 8`` bit ``k % 8``: the wire's order, so a chunk's
bitmap is OR-ed in without any conversion.  Pages in holes are never free and never covered.

The heavy loops (OR, fill, popcount, run extraction) are C, in :mod:`vballoon.fpmap._fastbits`
(``_fastbits_build.py`` beside this file), each bounds-checked against the sizes it is given.
"""
from __future__ import annotations

import bisect
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ConfigError
from ..wire import C, Layout

try:
    from ._fastbits import ffi, lib
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError("vballoon.fpmap._fastbits is not built: run `pip install -e .`") from e

PAGE_SHIFT = C.VIRTIO_BALLOON_BITMAP_PAGE_SHIFT
PAGE_SIZE = 1 << PAGE_SHIFT
PFN_ALIGN = C.VIRTIO_BALLOON_BITMAP_PFN_ALIGN
MAX_CHUNK_PFNS = C.VIRTIO_BALLOON_BITMAP_MAX_CHUNK_PFNS
CMD_GET_FREE = C.VIRTIO_BALLOON_BITMAP_CMD_GET_FREE
F_DONE = C.VIRTIO_BALLOON_BITMAP_F_DONE
MAX_PFNS = 1 << 36               # pfn space limit (256 TiB): 8 GiB per bitmap, holes included
SEGMENT_GAP_WORDS = 1 << 12     # a hole of more words (256 Ki pfns, 1 GiB) splits the bitmaps
RANGES_FIRST_CAPACITY = 1 << 14  # (start, npages) pairs; doubles as needed
COVER_BACKLOG = 4096             # covered intervals recorded before they are written out

REQUEST = Layout("virtio_balloon_bitmap_req")
CHUNK_HEADER = Layout("virtio_balloon_bitmap_chunk")
HDR_SIZE = CHUNK_HEADER.size
_U64_LIMIT = 1 << 64


def check_int(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ConfigError("fpmap-argument", f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def ram_extents(layout: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages of ``(guest_phys_addr, size)`` regions as sorted ``(start, end)`` pfns.

    Raises ConfigError("fpmap-layout") for no regions, empty, overlapping or overflowing ones,
    no whole page, or a pfn space past :data:`MAX_PFNS`.
    """
    regions = sorted((check_int("guest_phys_addr", g), check_int("size", s)) for g, s in layout)
    if not regions:
        raise ConfigError("fpmap-layout", "the memory layout has no regions")
    for g, s in regions:
        if s == 0 or g + s > _U64_LIMIT:
            raise ConfigError("fpmap-layout", f"region {g:#x}+{s:#x} is empty or "
                              "overflows 64 bits")
    for (g0, s0), (g1, _) in zip(regions, regions[1:]):
        if g0 + s0 > g1:
            raise ConfigError("fpmap-layout", f"regions overlap at {g1:#x}")
    ram = [(-(-g // PAGE_SIZE), (g + s) // PAGE_SIZE) for g, s in regions]
    ram = [(a, b) for a, b in ram if a < b]
    if not ram:
        raise ConfigError("fpmap-layout", "the layout holds no whole page")
    if ram[-1][1] > MAX_PFNS:
        raise ConfigError("fpmap-layout", f"RAM ends at pfn {ram[-1][1]:#x}, past the "
                          f"{MAX_PFNS:#x} pfns a map may span")
    return ram


def _zeroed(nwords: int) -> np.ndarray:
    """Zeroed words whose pages are touched now (``np.zeros`` would defer that to first use)."""
    words = np.empty(nwords, dtype=np.uint64)
    words.fill(0)
    return words


class _Segment:
    """The words ``[lo_word, lo_word + nwords)`` of a map's two bitmaps: one run of RAM
    extents whose holes between them are small enough to keep in the bitmaps."""

    def __init__(self, lo_word: int, hi_word: int) -> None:
        self.lo_word, self.nwords = lo_word, hi_word - lo_word
        self.base, self.end = lo_word * 64, hi_word * 64
        self.free = _zeroed(self.nwords)
        self.covered = _zeroed(self.nwords)
        self.free_p = ffi.from_buffer("uint64_t[]", self.free, require_writable=True)
        self.cov_p = ffi.from_buffer("uint64_t[]", self.covered, require_writable=True)


class FreePageMap:
    """Which pages of a guest were free during one round, and which pages the round covered.

    ``layout`` is the guest's RAM as ``(guest_phys_addr, size)`` pairs (``GuestMemory.ram_ranges``),
    e.g. ``[(0, 2 << 30), (4 << 30, 2 << 30)]`` for a 4 GiB x86 guest: the pfn space is
    ``[0, max_pfn)`` with the PCI hole in it.  A page not wholly inside one pair is a hole.

    Memory follows the RAM present, not the pfn span: the two bitmaps (``free`` and
    ``covered``) are kept per *segment*, a run of RAM extents separated by holes of at most
    :data:`SEGMENT_GAP_WORDS` words (64 pfns each); a larger hole starts a new segment and
    costs nothing.  A usual layout (RAM from 0, a PCI hole) is one segment of
    ``ceil(max_pfn / 64)`` words per bitmap -- 32 MiB each for a 1 TiB guest; a 64 MiB guest
    with a region at 16 TiB is two segments of a few KiB.  Nothing else of that order is
    allocated while chunks are merged.

    Both bitmaps are zeroed when the map is made — for a round, at the request, while the
    guest scans — so that merging chunks does not also pay the first-touch page faults.
    Coverage is written lazily: a merge records its pfn interval, and :attr:`covered` sets the
    recorded intervals' bits when it is read.  Merging then writes one bitmap, not two (the OR
    is memory-bound).
    """

    def __init__(self, layout: Iterable[tuple[int, int]]) -> None:
        ram = ram_extents(layout)
        #: ``(start_pfn, end_pfn)`` of every RAM extent, sorted
        self.ram: tuple[tuple[int, int], ...] = tuple(ram)
        self.max_pfn: int = ram[-1][1]
        self.ram_pages: int = sum(b - a for a, b in ram)
        #: words of one bitmap over the whole pfn space (the size of :attr:`free` as exported)
        self.nwords = -(-self.max_pfn // 64)
        spans: list[list[int]] = []
        for a, b in ram:
            lo, hi = a // 64, -(-b // 64)
            if spans and lo - spans[-1][1] <= SEGMENT_GAP_WORDS:
                spans[-1][1] = max(spans[-1][1], hi)
            else:
                spans.append([lo, hi])
        self._spans = [(lo, hi) for lo, hi in spans]
        self._segs = [_Segment(lo, hi) for lo, hi in spans]
        self._seg_base = [g.base for g in self._segs]
        self._cov_todo: list[tuple[int, int]] = []      # covered intervals not yet written
        self._cov_flushed = False                       # some coverage is in the bitmaps
        #: a compacted map (:meth:`compact`): its free and covered runs, (n, 2) int64 of
        #: (start_pfn, npages), ascending and disjoint; None while it keeps bitmaps
        self._free_runs: np.ndarray | None = None
        self._cov_runs: np.ndarray | None = None
        # Holes: the gaps between RAM extents (and the tail of the last word): [lo, hi) pfns.
        edges = [0] + [x for ext in ram for x in ext] + [self.nwords * 64]
        holes = [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)
                 if edges[i] < edges[i + 1]]
        self._hole_lo = [a for a, _ in holes]
        self._hole_hi = [b for _, b in holes]

    def __repr__(self) -> str:
        return (f"<FreePageMap max_pfn={self.max_pfn} ram_pages={self.ram_pages} "
                f"free={self.free_pages()} coverage={self.coverage():.3f}>")

    @property
    def allocated_bytes(self) -> int:
        """Bytes the map holds: its two bitmaps, or once compacted its runs."""
        if self._free_runs is not None:
            assert self._cov_runs is not None          # compacted: both kept as runs
            return self._free_runs.nbytes + self._cov_runs.nbytes
        return sum(g.free.nbytes + g.covered.nbytes for g in self._segs)

    @property
    def compacted(self) -> bool:
        """The map keeps runs, not bitmaps (:meth:`compact`)."""
        return self._free_runs is not None

    # -- compact form -----------------------------------------------------------------------

    def compact(self, *, force: bool = False) -> None:
        """Keep the map as its free and covered runs and drop the bitmaps (a round that has
        ended no longer changes).  Every reading method answers the same from the runs; a
        write (:meth:`or_bitmap`, :meth:`mark_free_range`) first expands the bitmaps again.

        A typical map (a guest after a workload) has a few hundred thousand free runs: 16
        bytes each, a small fraction of its bitmap.  A map whose runs would cost more than
        its bitmaps (a hostile, checkered one) stays as it is, unless ``force``."""
        if self._free_runs is not None:
            return
        counts = self._seg_run_counts("free")
        if not force and 16 * sum(counts) > self.allocated_bytes:
            return
        free = self._bitmap_runs("free", counts)       # exactly sized: one pass, no regrowth
        cov = self._covered_runs()
        self._free_runs, self._cov_runs = free, cov
        for a in (free, cov):
            a.flags.writeable = False
        self._free_count = int(free[:, 1].sum()) if len(free) else 0
        self._cov_count = int(cov[:, 1].sum()) if len(cov) else 0
        self._segs, self._seg_base = [], []

    def _covered_runs(self) -> np.ndarray:
        """The covered runs, (n, 2) int64: from the recorded intervals when none was written
        into the bitmap yet (the usual round: no bitmap pass at all), else from the bitmap."""
        if self._cov_flushed:
            self._flush_covered()
            return self._bitmap_runs("covered")
        todo = np.array(self._cov_todo, dtype=np.int64).reshape(-1, 2)
        if not len(todo):
            return np.zeros((0, 2), dtype=np.int64)
        order = np.argsort(todo[:, 0], kind="stable")
        lo, hi = todo[order, 0], todo[order, 1]
        reach = np.maximum.accumulate(hi)
        first = np.flatnonzero(np.concatenate(([True], lo[1:] > reach[:-1])))
        last = np.concatenate((first[1:], [lo.size])) - 1
        lo, hi = lo[first], reach[last]
        parts = []
        for a, b in self.ram:                     # intersect with RAM: holes are never covered
            x, y = np.maximum(lo, a), np.minimum(hi, b)
            keep = x < y
            if keep.any():
                parts.append(np.column_stack((x[keep], y[keep] - x[keep])))
        if not parts:
            return np.zeros((0, 2), dtype=np.int64)
        runs = np.concatenate(parts)
        runs = runs[np.argsort(runs[:, 0], kind="stable")]
        # extents that touch (no hole between them) give adjacent pieces: join them
        ends = runs[:, 0] + runs[:, 1]
        first = np.flatnonzero(np.concatenate(([True], runs[1:, 0] > ends[:-1])))
        last = np.concatenate((first[1:], [len(runs)])) - 1
        return np.ascontiguousarray(np.column_stack((runs[first, 0],
                                                     ends[last] - runs[first, 0])))

    def _seg_run_counts(self, which: str) -> list[int]:
        return [int(lib.fb_count_runs(g.free_p if which == "free" else g.cov_p, g.nwords, 0,
                                      g.nwords * 64)) for g in self._segs]

    def _bitmap_runs(self, which: str, counts: list[int] | None = None) -> np.ndarray:
        """Every run of one bitmap, (n, 2) int64 global pfns, in one exactly sized array."""
        counts = self._seg_run_counts(which) if counts is None else counts
        out = np.empty((sum(counts), 2), dtype=np.uint64)
        nxt = ffi.new("uint64_t *")
        k = 0
        for g, n in zip(self._segs, counts):
            if not n:
                continue
            words = g.free_p if which == "free" else g.cov_p
            with ffi.from_buffer("uint64_t[]", out[k:k + n], require_writable=True) as p:
                got = lib.fb_runs(words, g.nwords, 0, g.nwords * 64, p, n, nxt)
            assert got == n, (got, n)
            out[k:k + n, 0] += np.uint64(g.base)
            k += n
        return out.view(np.int64)

    def _expand(self) -> None:
        """Back from runs to bitmaps (a write to a compacted map)."""
        if self._free_runs is None:
            return
        free, cov = self._free_runs, self._cov_runs
        assert cov is not None                         # compacted: both kept as runs
        self._segs = [_Segment(lo, hi) for lo, hi in self._spans]
        self._seg_base = [g.base for g in self._segs]
        for g in self._segs:
            for runs, words in ((free, g.free_p), (cov, g.cov_p)):
                if len(runs):
                    with ffi.from_buffer("int64_t[]", runs) as p:
                        lib.fb_fill_runs(words, g.nwords, p, len(runs), g.base)
        self._cov_todo, self._cov_flushed = [], True
        self._free_runs = self._cov_runs = None

    def _clip(self, runs: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """The runs inside ``[lo, hi)``, clipped to it (a new array only if clipped)."""
        a = int(np.searchsorted(runs[:, 0] + runs[:, 1], lo, side="right"))
        b = int(np.searchsorted(runs[:, 0], hi, side="left"))
        part = runs[a:b]
        if len(part) and (part[0, 0] < lo or part[-1, 0] + part[-1, 1] > hi):
            part = part.copy()
            end = part[:, 0] + part[:, 1]
            part[:, 0] = np.maximum(part[:, 0], lo)
            part[:, 1] = np.minimum(end, hi) - part[:, 0]
        return part

    def _parts(self, lo: int, hi: int) -> Iterator[tuple[_Segment, int, int]]:
        """The segments ``[lo, hi)`` meets, each with the window's part inside it (global
        pfns); what falls between segments is hole."""
        k = max(0, bisect.bisect_right(self._seg_base, lo) - 1)
        while k < len(self._segs) and self._segs[k].base < hi:
            g = self._segs[k]
            a, b = max(lo, g.base), min(hi, g.end)
            if a < b:
                yield g, a, b
            k += 1

    # -- writing --------------------------------------------------------------------------

    def _check_range(self, start_pfn: int, npages: int) -> None:
        if start_pfn + npages > self.max_pfn:
            raise ConfigError("fpmap-range", f"pfns [{start_pfn:#x}, {start_pfn + npages:#x}) "
                              f"run past the end of the pfn space ({self.max_pfn:#x})")

    def _clear_holes(self, g: _Segment, words: Any, lo: int, hi: int) -> None:
        i = bisect.bisect_right(self._hole_hi, lo)
        while i < len(self._hole_lo) and self._hole_lo[i] < hi:
            a, b = max(lo, self._hole_lo[i]), min(hi, self._hole_hi[i])
            lib.fb_fill(words, g.nwords, a - g.base, b - g.base, 0)
            i += 1

    def _fill(self, which: str, lo: int, hi: int) -> None:
        self._expand()
        for g, a, b in self._parts(lo, hi):
            words = g.free_p if which == "free" else g.cov_p
            lib.fb_fill(words, g.nwords, a - g.base, b - g.base, 1)
            self._clear_holes(g, words, a, b)

    def _cover(self, lo: int, hi: int) -> None:
        self._expand()
        todo = self._cov_todo
        if todo and todo[-1][1] == lo:
            todo[-1] = (todo[-1][0], hi)
        else:
            todo.append((lo, hi))
            if len(todo) > COVER_BACKLOG:
                self._flush_covered()

    def _flush_covered(self) -> None:
        if self._free_runs is not None:
            return
        todo, self._cov_todo = self._cov_todo, []
        self._cov_flushed = self._cov_flushed or bool(todo)
        for lo, hi in todo:
            self._fill("covered", lo, hi)

    def or_bitmap(self, start_pfn: int, bits: Any, nbits: int | None = None) -> None:
        """OR ``nbits`` bits of ``bits`` into ``free`` at ``start_pfn``; mark them covered.

        ``bits`` is any contiguous buffer (bytes, memoryview of guest memory, numpy array) in
        wire bit order: bit *k* = byte ``k // 8`` bit ``k % 8`` = pfn ``start_pfn + k``
        (``nbits`` defaults to all of it).  Bits at or past ``nbits`` are ignored (spec §3.3:
        the driver zeroes them, the device does not rely on it).  Bits that fall in holes are
        dropped: a hole is never free, nor covered.

        Any ``start_pfn`` works.  A multiple of 8 is a plain byte-wise OR — the protocol
        requires a multiple of 64 (§3.2), and descriptor splits fall on byte boundaries — and
        anything else a shifted OR, several times slower.
        """
        self.or_pieces(start_pfn, (bits,), nbits)

    def or_pieces(self, start_pfn: int, pieces: Iterable[Any], nbits: int | None = None) -> None:
        """:meth:`or_bitmap` of a bitmap given as consecutive pieces (a chain's descriptors).

        The pieces' bytes, concatenated, are the bitmap; they may have any byte lengths.
        """
        start_pfn = check_int("start_pfn", start_pfn)
        try:
            srcs = [ffi.from_buffer("uint8_t[]", p) for p in pieces]
        except (TypeError, ValueError, BufferError) as e:
            raise ConfigError("fpmap-buffer", f"bitmap must be a contiguous buffer: {e}") from None
        lens = [len(p) for p in srcs]
        nbits = 8 * sum(lens) if nbits is None else check_int("nbits", nbits)
        if nbits > 8 * sum(lens):
            raise ConfigError("fpmap-short-buffer", f"{nbits} bits asked for, the buffer holds "
                              f"{8 * sum(lens)}")
        self._check_range(start_pfn, nbits)
        self.or_spans(start_pfn, ffi.new("uint8_t *[]", srcs), ffi.new("size_t[]", lens),
                       len(srcs), nbits)

    def or_spans(self, start_pfn: int, srcs: Any, lens: Any, n: int, nbits: int) -> None:
        """The merge itself: ``n`` spans as cffi ``uint8_t *[]`` / ``size_t[]`` arrays; the
        caller checked the window and that the spans hold ``nbits``."""
        self._expand()
        end = start_pfn + nbits
        parts = list(self._parts(start_pfn, end))
        if len(parts) == 1 and parts[0][1] == start_pfn and parts[0][2] == end:
            g = parts[0][0]           # the usual case: the chunk lies in one segment
            if lib.fb_or(g.free_p, g.nwords, srcs, lens, n, start_pfn - g.base, nbits):
                raise ConfigError("fpmap-range", "fb_or refused the window")  # pragma: no cover
            self._clear_holes(g, g.free_p, start_pfn, end)
        elif parts:                   # across segments: gather the bits, OR each part
            need = -(-nbits // 8)
            data = bytearray()
            for i in range(n):
                if len(data) >= need:
                    break
                data += ffi.buffer(srcs[i], min(lens[i], need - len(data)))[:]
            bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8),
                                 bitorder="little")[:nbits]
            for g, a, b in parts:
                piece = np.packbits(bits[a - start_pfn:b - start_pfn], bitorder="little")
                with ffi.from_buffer("uint8_t[]", piece) as p:
                    lib.fb_or(g.free_p, g.nwords, ffi.new("uint8_t *[]", [p]),
                              ffi.new("size_t[]", [len(piece)]), 1, a - g.base, b - a)
                self._clear_holes(g, g.free_p, a, b)
        self._cover(start_pfn, end)

    def mark_free_range(self, pfn: int, npages: int) -> None:
        """Mark ``[pfn, pfn+npages)`` free and covered (a FREE_PAGE_HINT block; holes excepted).

        A hinted block is known to have been free, so it counts as covered; everything the hints
        did not name stays unknown.
        """
        pfn, npages = check_int("pfn", pfn), check_int("npages", npages)
        self._check_range(pfn, npages)
        self._fill("free", pfn, pfn + npages)
        self._cover(pfn, pfn + npages)

    # -- reading --------------------------------------------------------------------------

    def _dense(self, which: str) -> np.ndarray:
        if self._free_runs is not None:
            runs = self._free_runs if which == "free" else self._cov_runs
            assert runs is not None                    # compacted: both kept as runs
            out = _zeroed(self.nwords)
            if len(runs):
                with ffi.from_buffer("uint64_t[]", out, require_writable=True) as w, \
                        ffi.from_buffer("int64_t[]", runs) as p:
                    lib.fb_fill_runs(w, self.nwords, p, len(runs), 0)
            return out
        segs = self._segs
        if len(segs) == 1 and segs[0].lo_word == 0 and segs[0].nwords == self.nwords:
            return getattr(segs[0], which)
        out = np.zeros(self.nwords, dtype=np.uint64)
        for g in segs:
            hi = min(g.lo_word + g.nwords, self.nwords)
            out[g.lo_word:hi] = getattr(g, which)[:hi - g.lo_word]
        return out

    @property
    def free(self) -> np.ndarray:
        """The free bitmap over ``[0, max_pfn)`` (``nwords`` words; made on demand, a copy,
        when the map has more than one segment)."""
        return self._dense("free")

    @property
    def covered(self) -> np.ndarray:
        """The covered bitmap (layout of :attr:`free`): pages some chunk or hint spoke of."""
        self._flush_covered()
        return self._dense("covered")

    def free_pages(self) -> int:
        """Pages marked free (never in a hole)."""
        if self._free_runs is not None:
            return self._free_count
        return sum(int(lib.fb_popcount(g.free_p, g.nwords, 0, g.nwords * 64))
                   for g in self._segs)

    def covered_pages(self) -> int:
        """RAM pages some chunk (or hint) of the round said something about."""
        if self._free_runs is not None:
            return self._cov_count
        self._flush_covered()
        return sum(int(lib.fb_popcount(g.cov_p, g.nwords, 0, g.nwords * 64))
                   for g in self._segs)

    def coverage(self) -> float:
        """Covered RAM pages / RAM pages, in [0, 1].  Uncovered pages are unknown, not free."""
        return self.covered_pages() / self.ram_pages

    def _window(self, start_pfn: int, end_pfn: int | None) -> tuple[int, int]:
        lo = check_int("start_pfn", start_pfn)
        hi = self.max_pfn if end_pfn is None else check_int("end_pfn", end_pfn)
        if lo > hi or hi > self.max_pfn:
            raise ConfigError("fpmap-window", f"window [{lo:#x}, {hi:#x}) is not inside "
                              f"[0, {self.max_pfn:#x})")
        return lo, hi

    def _runs(self, lo: int, hi: int, cap: int) -> Iterator[np.ndarray]:
        """The free ranges of ``[lo, hi)`` in ascending batches of at most ``cap``."""
        if self._free_runs is not None:
            part = self._clip(self._free_runs, lo, hi)
            for i in range(0, len(part), cap):
                yield part[i:i + cap]
            return
        nxt = ffi.new("uint64_t *")
        for g, a, b in self._parts(lo, hi):
            a, b = a - g.base, b - g.base
            while a < b:
                out = np.empty((cap, 2), dtype=np.uint64)
                with ffi.from_buffer("uint64_t[]", out, require_writable=True) as p:
                    got = lib.fb_runs(g.free_p, g.nwords, a, b, p, cap, nxt)
                assert 0 <= got <= cap and a <= nxt[0] <= b, (got, nxt[0])
                if got:
                    part = out[:got].view(np.int64)
                    part[:, 0] += g.base
                    yield part
                a = nxt[0]

    def ranges(self) -> np.ndarray:
        """The free ranges: an ``(n, 2)`` int64 array of ``(start_pfn, npages)``, ascending."""
        return self.ranges_in(0, self.max_pfn)

    def ranges_in(self, start_pfn: int, end_pfn: int) -> np.ndarray:
        """The free ranges inside ``[start_pfn, end_pfn)``, clipped to it (see :meth:`ranges`).

        One pass: the kernel fills the array it is given and says where it stopped; the array
        doubles and the scan resumes there.  The result may be a view of a buffer up to twice
        its size.
        """
        lo, hi = self._window(start_pfn, end_pfn)
        if self._free_runs is not None:
            return self._clip(self._free_runs, lo, hi)
        out = np.empty((RANGES_FIRST_CAPACITY, 2), dtype=np.uint64)
        n, nxt = 0, ffi.new("uint64_t *")
        for g, a, b in self._parts(lo, hi):
            a, b = a - g.base, b - g.base
            while True:
                if n == len(out):
                    grown = np.empty((2 * len(out), 2), dtype=np.uint64)
                    grown[:n] = out[:n]
                    out = grown
                with ffi.from_buffer("uint64_t[]", out[n:], require_writable=True) as p:
                    got = lib.fb_runs(g.free_p, g.nwords, a, b, p, len(out) - n, nxt)
                assert 0 <= got <= len(out) - n and a <= nxt[0] <= b, (got, nxt[0])
                out[n:n + got, 0] += np.uint64(g.base)
                n, a = n + got, nxt[0]
                if a == b:
                    break
        return out[:n].view(np.int64)

    def count_ranges(self, start_pfn: int = 0, end_pfn: int | None = None) -> int:
        """How many free ranges :meth:`ranges_in` would return, without making them."""
        lo, hi = self._window(start_pfn, end_pfn)
        if self._free_runs is not None:
            return len(self._clip(self._free_runs, lo, hi))
        return sum(int(lib.fb_count_runs(g.free_p, g.nwords, a - g.base, b - g.base))
                   for g, a, b in self._parts(lo, hi))

    def range_page(self, start_pfn: int, limit: int) -> tuple[np.ndarray, int, int | None]:
        """One page of free ranges from ``start_pfn`` on: ``(ranges, count, next_pfn)``.

        ``ranges``: the first ``limit`` ranges of ``[start_pfn, max_pfn)`` (clipped at
        ``start_pfn``); ``count``: how many there are in all; ``next_pfn``: where the next page
        starts (the end of the last range returned, or ``start_pfn`` if none was), None when
        this page holds the last range.  Costs ``limit`` ranges of memory, however many exist.
        """
        lo, hi = self._window(start_pfn, None)
        limit = check_int("limit", limit)
        count = self.count_ranges(lo, hi)
        n = min(limit, count)
        part = np.empty((n, 2), dtype=np.int64)
        got = 0
        if n:
            for batch in self._runs(lo, hi, n):
                k = min(len(batch), n - got)
                part[got:got + k] = batch[:k]
                got += k
                if got == n:
                    break
        if count <= n:
            return part, count, None
        return part, count, int(part[-1, 0] + part[-1, 1]) if n else lo

    def iter_ranges(self, start_pfn: int = 0, end_pfn: int | None = None,
                    batch: int = 1 << 16) -> Iterator[np.ndarray]:
        """The free ranges of a window in ascending ``(n <= batch, 2)`` arrays.

        For consumers that stream (export, discard): memory stays ``16 * batch`` bytes however
        fragmented the map is (a hostile guest can make 2^27 ranges out of 1 TiB).
        """
        lo, hi = self._window(start_pfn, end_pfn)
        batch = check_int("batch", batch)
        if batch == 0:
            raise ConfigError("fpmap-argument", "batch must be at least 1")
        yield from self._runs(lo, hi, batch)

    def file_ranges(self, regions: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """The free ranges as ``(region index, file offset, length)`` rows, in bytes, int64.

        ``regions`` are ``(guest_phys_addr, size, mmap_offset)`` as in a vhost-user memory
        table; the index is the position in ``regions``.  A range is split at region edges,
        and parts outside every region are left out.  Rows come in guest-physical order.

        For consumers that read guest memory through the region fds (a migration engine).
        Never punch holes with them: these pages were only *hinted* free (``protocol/bitmap-queue.md`` §7).
        """
        regs = []
        for i, r in enumerate(regions):
            g, s, off = (check_int(n, v)
                         for n, v in zip(("guest_phys_addr", "size", "mmap_offset"), r))
            if g + s >= 1 << 63 or off + s >= 1 << 63:
                raise ConfigError("fpmap-regions", f"region {i} ends past 2^63")
            regs.append((g, s, off, i))
        regs.sort()
        for (g0, s0, _, i0), (g1, _, _, i1) in zip(regs, regs[1:]):
            if g0 + s0 > g1:
                raise ConfigError("fpmap-regions", f"regions {i0} and {i1} overlap")
        runs = self.ranges()
        start = runs[:, 0] << PAGE_SHIFT
        end = start + (runs[:, 1] << PAGE_SHIFT)
        parts = []
        for g, s, off, i in regs:
            a = int(np.searchsorted(end, g, side="right"))
            b = int(np.searchsorted(start, g + s, side="left"))
            if a >= b:
                continue
            lo = np.maximum(start[a:b], g)
            hi = np.minimum(end[a:b], g + s)
            rows = np.empty((b - a, 3), dtype=np.int64)
            rows[:, 0] = i
            rows[:, 1] = lo - g + off
            rows[:, 2] = hi - lo
            parts.append(rows)
        return np.concatenate(parts) if parts else np.empty((0, 3), dtype=np.int64)
