"""The reference guest side of the bitmap queue (protocol/bitmap-queue.md, "the spec").

Three things, all pure Python + numpy, none touching a real guest:

* :class:`BuddyModel` — a Linux guest's buddy allocator as the seed scanner sees it: zones
  (spanned ``[start_pfn, end_pfn)``), and per zone, order (0..10) and migrate type a free list of
  naturally aligned blocks, in list order.  Built by hand, from a free-page mask (canonical
  buddy decomposition), or :meth:`BuddyModel.after_workload` ("an 8 GB guest after a
  memory-hungry workload exited", the seed's headline case, lineage §1.5).
* Two scanners with the seed's signature ``(start_pfn, end_pfn, bitmaps, bits, nr_bmap)`` and
  return codes (−1 bad arguments, 1 more to scan, 0 done): :meth:`BuddyModel.get_unused_pages`,
  the *intended* semantics (protocol/bitmap-queue.md §9, the seed's boundary bug), and
  :meth:`BuddyModel.seed_get_unused_pages`, a line-by-line transliteration of the v3 C function
  ``mark_unused_pages_bitmap()`` (RESEND v3 5/7, Message-Id
  1477031080-12616-6-git-send-email-liang.z.li@intel.com) with its slow-path ``pos`` bug
  (lineage §5.2).
* :func:`driver_chunks` — the seed driver's loop (``send_unused_pages_info()``, v3 7/7) as a
  pure generator of the spec's chunks, ready to be put on the bitmap queue.

Bitmaps are Linux ``unsigned long`` arrays on a little-endian guest: bit *k* is byte ``k // 8``,
bit ``k % 8``, which is the wire order (spec §3.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from vballoon.errors import ConfigError
from vballoon.wire import C, Layout

MAX_ORDER = 11                       # orders 0..10: 4 MiB blocks (Linux MAX_ORDER, x86 default)
MIGRATE_TYPES = ("Unmovable", "Movable", "Reclaimable", "HighAtomic", "CMA", "Isolate")
PAGEBLOCK_ORDER = 9                  # migrate types are per 2 MiB pageblock
PAGE_SHIFT = C.VIRTIO_BALLOON_BITMAP_PAGE_SHIFT
PFNS_PER_BMAP = C.VIRTIO_BALLOON_BITMAP_PFNS_PER_BMAP
MAX_BMAPS = C.VIRTIO_BALLOON_BITMAP_MAX_BMAPS
MAX_CHUNK_PFNS = C.VIRTIO_BALLOON_BITMAP_MAX_CHUNK_PFNS
CMD_GET_FREE = C.VIRTIO_BALLOON_BITMAP_CMD_GET_FREE
F_DONE = C.VIRTIO_BALLOON_BITMAP_F_DONE
REQUEST = Layout("virtio_balloon_bitmap_req")
CHUNK_HEADER = Layout("virtio_balloon_bitmap_chunk")

ScanFn = Callable[[int, int, Sequence[Any], int, int], int]


class SeedUndefinedBehaviour(RuntimeError):
    """The seed C code read its uninitialised local ``pos`` (lineage §5.2).

    In C this indexes ``bitmap[garbage / bits]`` and sets a bit somewhere in kernel memory; the
    transliteration stops here instead of guessing what the garbage was.
    """


# -- the buddy allocator model ---------------------------------------------------------------------

class Zone:
    """One zone: its span and its free lists ``free_area[order][migrate type]`` (pfn arrays).

    ``free_area`` is given as ``{(order, migrate type name): [block pfns in list order]}``.
    """

    def __init__(self, name: str, start_pfn: int, end_pfn: int,
                 free_area: Mapping[tuple[int, str], Sequence[int]] | None = None) -> None:
        if not 0 <= start_pfn <= end_pfn:
            raise ConfigError("scanner-zone", f"zone {name}: bad span [{start_pfn}, {end_pfn})")
        self.name, self.start_pfn, self.end_pfn = name, start_pfn, end_pfn
        self.free_area = [[np.zeros(0, dtype=np.int64) for _ in MIGRATE_TYPES]
                          for _ in range(MAX_ORDER)]
        for (order, mtype), pfns in (free_area or {}).items():
            if not 0 <= order < MAX_ORDER or mtype not in MIGRATE_TYPES:
                raise ConfigError("scanner-zone", f"zone {name}: no free list ({order}, {mtype})")
            self.free_area[order][MIGRATE_TYPES.index(mtype)] = np.asarray(pfns, dtype=np.int64)

    @property
    def spanned_pages(self) -> int:
        return self.end_pfn - self.start_pfn

    def blocks(self) -> Iterator[tuple[int, int, int]]:
        """``(pfn, order, migrate type index)`` in ``for_each_migratetype_order`` list order."""
        for order in range(MAX_ORDER):
            for t in range(len(MIGRATE_TYPES)):
                for pfn in self.free_area[order][t].tolist():
                    yield pfn, order, t

    def __repr__(self) -> str:
        n = sum(len(lst) for area in self.free_area for lst in area)
        return f"<Zone {self.name} [{self.start_pfn:#x}, {self.end_pfn:#x}) {n} free blocks>"


class BuddyModel:
    """A guest's physical memory as its buddy allocator holds it (4 KiB pages).

    ``ram`` lists the present ``(start_pfn, end_pfn)`` extents; ``max_pfn`` is the end of the
    last one (Linux ``max_pfn``).  The constructor checks what the kernel guarantees: blocks are
    naturally aligned, inside their zone and inside RAM, and no two overlap.
    """

    def __init__(self, zones: Sequence[Zone], ram: Sequence[tuple[int, int]]) -> None:
        self.zones = list(zones)
        self.ram = sorted((int(a), int(b)) for a, b in ram if a < b)
        if not self.ram:
            raise ConfigError("scanner-ram", "a model needs some RAM")
        for (a0, b0), (a1, _) in zip(self.ram, self.ram[1:]):
            if b0 > a1:
                raise ConfigError("scanner-ram", f"RAM extents overlap at pfn {a1:#x}")
        self.max_pfn = self.ram[-1][1]
        zs = sorted(self.zones, key=lambda z: z.start_pfn)
        for z0, z1 in zip(zs, zs[1:]):
            if z0.end_pfn > z1.start_pfn:
                raise ConfigError("scanner-zone", f"zones {z0.name} and {z1.name} overlap")
        pfn, npages = [], []
        for z in self.zones:
            for order in range(MAX_ORDER):
                p = np.concatenate(z.free_area[order])
                if len(p) and ((p % (1 << order)).any() or p.min() < z.start_pfn
                               or (p + (1 << order)).max() > z.end_pfn):
                    raise ConfigError("scanner-block", f"zone {z.name}: an order-{order} block "
                                      "is unaligned or outside the zone")
                pfn.append(p)
                npages.append(np.full(len(p), 1 << order, dtype=np.int64))
        p, n = np.concatenate(pfn), np.concatenate(npages)
        by_pfn = np.argsort(p, kind="stable")
        #: every free block, sorted by pfn: start pfns and lengths in pages
        self.block_pfn, self.block_pages = p[by_pfn], n[by_pfn]
        ends = self.block_pfn + self.block_pages
        if (ends[:-1] > self.block_pfn[1:]).any():
            raise ConfigError("scanner-block", "free blocks overlap")
        ram_lo = np.array([a for a, _ in self.ram], dtype=np.int64)
        ram_hi = np.array([b for _, b in self.ram], dtype=np.int64)
        k = np.searchsorted(ram_lo, self.block_pfn, side="right") - 1
        if (k < 0).any() or (ends > ram_hi[np.maximum(k, 0)]).any():
            raise ConfigError("scanner-block", "a free block is not inside one RAM extent")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_free_mask(cls, free: np.ndarray, ram: Sequence[tuple[int, int]] | None = None,
                       zones: Sequence[tuple[str, int, int]] | None = None,
                       seed: int = 0) -> "BuddyModel":
        """The model whose free pages are ``free`` (bool per pfn from 0), canonically split.

        As the buddy allocator merges every pair of free buddies, the free blocks are the
        maximal aligned power-of-two blocks (order <= 10) of each free run, within its zone.
        ``zones`` are ``(name, start_pfn, end_pfn)``; by default one zone spans all.
        Migrate types are drawn per pageblock and list order shuffled, both from ``seed``.
        """
        free = np.asarray(free, dtype=bool)
        ram = [(0, len(free))] if ram is None else list(ram)
        zones = [("Normal", 0, max(b for _, b in ram))] if zones is None else list(zones)
        present = np.zeros(max(len(free), max(b for _, b in ram)), dtype=bool)
        for a, b in ram:
            present[a:b] = True
        if (free & ~present[:len(free)]).any():
            raise ConfigError("scanner-ram", "a free page lies outside RAM")
        edges = np.flatnonzero(np.diff(np.concatenate(([0], free.astype(np.int8), [0]))))
        return cls._from_runs(edges[0::2], edges[1::2], ram, zones, np.random.default_rng(seed))

    @classmethod
    def after_workload(cls, mem_bytes: int, seed: int = 0, *, used_fraction: float = 0.045,
                       layout: str = "q35") -> "BuddyModel":
        """A guest with ``mem_bytes`` of RAM right after a memory-hungry workload exited.

        ``layout="q35"`` places RAM as QEMU q35 does: below 2 GiB, the rest from 4 GiB, when
        there are 2.75 GiB or more; ``"flat"`` puts it all at ``[0, mem_bytes)`` (so 1 TiB is
        exactly 32 chunks).  Zones DMA [0, 16 MiB), DMA32 [16 MiB, 4 GiB), Normal above.
        Used: the first MiB (firmware), 64 MiB of kernel at 16 MiB, and ``used_fraction`` of
        RAM (the seed's 8 GB case sent 4.4 % of RAM, lineage §1.5): 40 % of it in a few large
        allocations, 60 % scattered in small ones (geometric, mean 24 pages: slab, page
        tables, page cache) — so mostly order-10 free blocks, with every order in between.
        """
        pages = mem_bytes >> PAGE_SHIFT
        if pages < 1 << 15:
            raise ConfigError("scanner-argument", "after_workload wants at least 128 MiB")
        if layout not in ("q35", "flat"):
            raise ConfigError("scanner-argument", f"unknown layout {layout!r}")
        low = 1 << 19 if pages >= 0xB0000 and layout == "q35" else pages   # q35 lowmem: 2 GiB
        ram = [(0, low)] + ([(1 << 20, (1 << 20) + pages - low)] if pages > low else [])
        max_pfn = ram[-1][1]
        zones = [("DMA", 0, 1 << 12), ("DMA32", 1 << 12, min(max_pfn, 1 << 20))]
        if max_pfn > 1 << 20:
            zones.append(("Normal", 1 << 20, max_pfn))
        rng = np.random.default_rng(seed)
        ram_lo = np.array([a for a, _ in ram])
        ram_n = np.array([b - a for a, b in ram])

        def at(idx: np.ndarray) -> np.ndarray:       # the idx-th RAM page's pfn
            k = np.searchsorted(np.cumsum(ram_n), idx, side="right")
            return ram_lo[k] + idx - np.concatenate(([0], np.cumsum(ram_n)))[k]

        budget = used_fraction * pages
        big = rng.lognormal(np.log(2048), 1.0,                 # mean 2048 * e^0.5 pages
                            size=max(1, int(0.4 * budget / (2048 * np.exp(0.5)))))
        small = rng.geometric(1 / 24, size=int(0.6 * budget / 24))
        size = np.concatenate(([256, 16384], big.astype(np.int64) + 1, small))
        start = np.concatenate(([0, 4096], at(rng.integers(0, pages, len(size) - 2))))
        lo, hi = _free_runs(start, start + size, ram)
        return cls._from_runs(lo, hi, ram, zones, rng)

    @classmethod
    def _from_runs(cls, lo: np.ndarray, hi: np.ndarray, ram: Sequence[tuple[int, int]],
                   zones: Sequence[tuple[str, int, int]], rng: np.random.Generator) -> "BuddyModel":
        lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
        max_pfn = max(b for _, b in ram)
        # one migrate type per pageblock: mostly Movable, as after a workload of user pages
        pb_type = rng.choice(3, size=(max_pfn >> PAGEBLOCK_ORDER) + 1, p=[0.05, 0.9, 0.05])
        built = []
        for name, zlo, zhi in zones:
            a, b = np.maximum(lo, zlo), np.minimum(hi, zhi)
            keep = a < b
            pfn, order = buddy_blocks(a[keep], b[keep])
            mtype = pb_type[pfn >> PAGEBLOCK_ORDER]
            area: dict[tuple[int, str], Any] = {}
            for o in range(MAX_ORDER):
                for t in range(len(MIGRATE_TYPES)):
                    sel = pfn[(order == o) & (mtype == t)]
                    if len(sel):
                        area[(o, MIGRATE_TYPES[t])] = rng.permutation(sel)
            built.append(Zone(name, zlo, zhi, area))
        return cls(built, ram)

    # -- views ----------------------------------------------------------------------------------

    @property
    def layout(self) -> list[tuple[int, int]]:
        """The RAM as ``(guest_phys_addr, size)`` byte pairs (what a FreePageMap is built from)."""
        return [(a << PAGE_SHIFT, (b - a) << PAGE_SHIFT) for a, b in self.ram]

    def free_pages(self) -> int:
        return int(self.block_pages.sum())

    def free_bitmap(self) -> np.ndarray:
        """Every free page as a bitmap over ``[0, max_pfn)``: uint64 words, wire bit order."""
        words = np.zeros(-(-self.max_pfn // 64), dtype=np.uint64)
        big = self.block_pages >= 64                    # whole words (aligned blocks)
        p, n = self.block_pfn[big] // 64, self.block_pages[big] // 64
        idx = np.repeat(p, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        words[idx] = ~np.uint64(0)
        p, n = self.block_pfn[~big], self.block_pages[~big]
        mask = ((np.uint64(1) << n.astype(np.uint64)) - np.uint64(1)) << (p % 64).astype(np.uint64)
        np.bitwise_or.at(words, p // 64, mask)
        return words

    def free_mask(self) -> np.ndarray:
        """Every free page as a bool per pfn in ``[0, max_pfn)`` (for small models)."""
        bits = np.unpackbits(self.free_bitmap().view(np.uint8), bitorder="little")
        return bits[:self.max_pfn].astype(bool)

    def populated_zones(self) -> Iterator[Zone]:
        """``for_each_populated_zone``: zones with present pages."""
        for z in self.zones:
            if any(a < z.end_pfn and z.start_pfn < b for a, b in self.ram):
                yield z

    # -- the scanners ---------------------------------------------------------------------------

    def get_unused_pages(self, start_pfn: int, end_pfn: int, bitmaps: Sequence[Any] | None,
                         bits: int, nr_bmap: int) -> int:
        """The intended semantics of the seed's ``get_unused_pages()`` (lineage §5.1).

        With ``E = min(end_pfn, start_pfn + nr_bmap * bits)``, set bit ``o % bits`` of
        ``bitmaps[o // bits]``, ``o = p - start_pfn``, for every pfn ``p`` in ``[start_pfn, E)``
        inside a free block — blocks that begin before ``start_pfn`` or run past ``E``
        included, clipped.  Only sets bits: the caller zeroes the bitmaps.  Returns −1 on bad
        arguments (those of the C function, plus fewer than ``nr_bmap`` writable buffers of
        ``ceil(bits / 8)`` bytes), 1 if ``end_pfn < max_pfn`` (more to scan), else 0.
        """
        bmaps = _bitmaps(bitmaps, bits, nr_bmap)
        if bmaps is None or start_pfn > end_pfn or start_pfn < 0:
            return -1
        end = min(end_pfn, start_pfn + nr_bmap * bits)
        a = int(np.searchsorted(self.block_pfn + self.block_pages, start_pfn, side="right"))
        b = int(np.searchsorted(self.block_pfn, end, side="left"))
        lo = np.maximum(self.block_pfn[a:b], start_pfn) - start_pfn
        hi = np.minimum(self.block_pfn[a:b] + self.block_pages[a:b], end) - start_pfn
        width = end - start_pfn
        edge = np.zeros(width + 1, dtype=np.int8)
        np.add.at(edge, lo, 1)
        np.add.at(edge, hi, -1)
        window = np.cumsum(edge[:-1], dtype=np.int8).astype(bool)
        for i, bmap in enumerate(bmaps):
            part = window[i * bits:(i + 1) * bits]
            if not len(part):
                break
            packed = np.packbits(part, bitorder="little")
            bmap[:len(packed)] |= packed
        return 1 if end_pfn < self.max_pfn else 0

    def seed_get_unused_pages(self, start_pfn: int, end_pfn: int,
                              bitmap: Sequence[Any] | None, bits: int, nr_bmap: int) -> int:
        """``get_unused_pages()`` of the seed (v3 5/7), transliterated, bugs included.

        Returns as the C does (the same −1 cases as :meth:`get_unused_pages`).  Raises
        :class:`SeedUndefinedBehaviour` where the C reads its uninitialised ``pos``.
        """
        bmaps = _bitmaps(bitmap, bits, nr_bmap)
        if bmaps is None or start_pfn > end_pfn or start_pfn < 0:
            return -1
        ret = 0
        if end_pfn < self.max_pfn:
            ret = 1
        if end_pfn >= self.max_pfn:
            ret = 0
        for zone in self.populated_zones():
            _seed_mark_unused_pages_bitmap(zone, start_pfn, end_pfn, bmaps, bits, nr_bmap)
        return ret


def _seed_mark_unused_pages_bitmap(zone: Zone, start_pfn: int, end_pfn: int,
                                   bitmap: list[np.ndarray], bits: int, nr_bmap: int) -> None:
    """``mark_unused_pages_bitmap()`` of the seed, line by line (lineage §5.2 for the bug).

    The fast-path test compares against the *exclusive* end ``pfn + nr_pg``, so a block that
    ends exactly on a bitmap boundary takes the slow path, which sets bit ``pos`` of
    ``bitmap[0]`` ``nr_pg`` times: ``pos`` is whatever the last fast-path block left, or, if
    none ran yet in this zone, uninitialised.
    """
    pos: int | None = None                   # unsigned long pos;  (uninitialised)
    if zone.spanned_pages == 0:              # if (zone_is_empty(zone)) return;
        return
    end_pfn = min(start_pfn + nr_bmap * bits, end_pfn)
    # spin_lock_irqsave(&zone->lock, flags);
    for order in range(MAX_ORDER):           # for_each_migratetype_order(order, t)
        for t in range(len(MIGRATE_TYPES)):
            for pfn in zone.free_area[order][t].tolist():    # list_for_each(curr, ...)
                if pfn < start_pfn or pfn >= end_pfn:
                    continue
                nr_pg = 1 << order
                if pfn + nr_pg > end_pfn:
                    nr_pg = end_pfn - pfn
                bmap_idx = (pfn - start_pfn) // bits
                if bmap_idx == (pfn + nr_pg - start_pfn) // bits:
                    bmap = bitmap[bmap_idx]
                    pos = (pfn - start_pfn) % bits
                    bitmap_set(bmap, pos, nr_pg)
                else:
                    for _i in range(nr_pg):
                        if pos is None:
                            raise SeedUndefinedBehaviour(
                                f"zone {zone.name}: the slow path for the order-{order} block "
                                f"at pfn {pfn:#x} reads pos before any assignment")
                        bmap_idx = pos // bits
                        bmap = bitmap[bmap_idx]
                        pos = pos % bits
                        bitmap_set(bmap, pos, 1)
    # spin_unlock_irqrestore(&zone->lock, flags);


def bitmap_set(bmap: np.ndarray, pos: int, n: int) -> None:
    """Linux ``bitmap_set()``: set bits ``[pos, pos + n)`` of a little-endian bitmap (uint8)."""
    end = pos + n
    if n <= 0:
        return
    if pos // 8 == (end - 1) // 8:
        bmap[pos // 8] |= ((1 << n) - 1) << (pos % 8)
        return
    if pos % 8:
        bmap[pos // 8] |= (0xFF << (pos % 8)) & 0xFF
    bmap[-(-pos // 8):end // 8] = 0xFF
    if end % 8:
        bmap[end // 8] |= (1 << (end % 8)) - 1


def _bitmaps(bitmap: Sequence[Any] | None, bits: int, nr_bmap: int) -> list[np.ndarray] | None:
    """uint8 views of the first ``nr_bmap`` buffers, or None where the C would return −1."""
    if bitmap is None or len(bitmap) == 0 or bitmap[0] is None or nr_bmap <= 0 or bits <= 0:
        return None
    if len(bitmap) < nr_bmap:
        return None
    out = []
    for b in bitmap[:nr_bmap]:
        try:
            v = np.frombuffer(b, dtype=np.uint8)
        except (TypeError, ValueError):
            return None
        if not v.flags.writeable or len(v) * 8 < bits:
            return None
        out.append(v)
    return out


def buddy_blocks(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split free runs ``[lo, hi)`` into the blocks a buddy allocator holds them as.

    Each run becomes its maximal naturally aligned power-of-two blocks of order at most
    ``MAX_ORDER - 1``.  Returns ``(pfn, order)`` arrays.
    """
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    top = MAX_ORDER - 1
    big = np.int64(1 << top)
    a, b = -(-lo // big) * big, hi // big * big
    mid = a < b
    n = (b - a)[mid] // big                                    # whole top-order blocks
    pfns = [np.repeat(a[mid], n) + big * (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))]
    orders = [np.full(int(n.sum()), top, dtype=np.int64)]
    # the rest, shorter than two top-order blocks: greedy, one block per run per step
    p = np.concatenate((lo[mid], b[mid], lo[~mid]))
    e = np.concatenate((a[mid], hi[mid], hi[~mid]))
    while True:
        live = p < e
        if not live.any():
            break
        p, e = p[live], e[live]
        low_bit = np.where(p == 0, big, p & -p)
        k = np.minimum(np.minimum(_floor_log2(low_bit), _floor_log2(e - p)), top)
        pfns.append(p.copy())
        orders.append(k)
        p = p + (np.int64(1) << k)
    return np.concatenate(pfns), np.concatenate(orders)


def _free_runs(used_lo: np.ndarray, used_hi: np.ndarray,
               ram: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """RAM minus the used runs ``[used_lo, used_hi)`` (which may overlap): ``(lo, hi)`` runs."""
    order = np.argsort(used_lo, kind="stable")
    s, e = used_lo[order], np.maximum.accumulate(used_hi[order])
    new = np.concatenate(([True], s[1:] > e[:-1]))           # merge overlapping used runs
    s, e = s[new], e[np.concatenate((new[1:], [True]))]
    los, his = [], []
    for a, b in ram:
        k = (s < b) & (e > a)
        los.append(np.concatenate(([a], np.minimum(e[k], b))))
        his.append(np.concatenate((np.maximum(s[k], a), [b])))
    lo, hi = np.concatenate(los), np.concatenate(his)
    keep = lo < hi
    return lo[keep], hi[keep]


_POW2 = np.int64(1) << np.arange(63, dtype=np.int64)


def _floor_log2(x: np.ndarray) -> np.ndarray:
    return np.searchsorted(_POW2, x, side="right").astype(np.int64) - 1


# -- the driver's loop -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """One chunk (spec §3): a header and the bitmap buffers that follow it in the chain."""

    id: int
    start_pfn: int
    nr_pfns: int
    flags: int
    bitmaps: tuple[bytes, ...]
    page_shift: int = PAGE_SHIFT
    cmd: int = CMD_GET_FREE

    @property
    def done(self) -> bool:
        return bool(self.flags & F_DONE)

    def header(self) -> bytes:
        return CHUNK_HEADER.pack(self.cmd, self.page_shift, self.flags, 0, self.id,
                                 self.start_pfn, self.nr_pfns)

    def buffers(self) -> list[bytes]:
        """The chain's device-readable buffers, in order: the header, then each bitmap."""
        return [self.header(), *self.bitmaps]


def driver_chunks(model: BuddyModel, request_id: int, *, pfns_per_bmap: int = PFNS_PER_BMAP,
                  nr_bmap: int = MAX_BMAPS, scan: ScanFn | None = None) -> Iterator[Chunk]:
    """The chunks a driver sends for request ``request_id``: the seed's loop, made pure.

    As ``send_unused_pages_info()`` (v3 7/7): ``pfn = 0, pfn_limit, 2 * pfn_limit, ...`` with
    ``pfn_limit = pfns_per_bmap * nr_bmap``; each pass zeroes the bitmaps, scans
    ``[pfn, pfn + pfn_limit)``, and sends every bitmap buffer (CONT), until the scanner
    returns 0: that chunk is DONE and covers up to ``max_pfn`` exactly — ``nr_pfns`` counts
    bits, so the seed's ``bmap_len = nr_pfn / 8`` truncation (lineage §5.3) is gone.  Each
    buffer is ``8 * ceil(pfns / 64)`` bytes.  ``scan`` defaults to the intended scanner; pass
    ``model.seed_get_unused_pages`` to run the seed's.
    """
    if pfns_per_bmap <= 0 or pfns_per_bmap % 64 or not 0 < nr_bmap <= MAX_BMAPS \
            or pfns_per_bmap * nr_bmap > MAX_CHUNK_PFNS:
        raise ConfigError("scanner-argument", f"{nr_bmap} bitmaps of {pfns_per_bmap} pfns: "
                          f"want a multiple of 64 pfns, at most {MAX_BMAPS} bitmaps and "
                          f"{MAX_CHUNK_PFNS} pfns per chunk")
    scan = model.get_unused_pages if scan is None else scan
    bmaps = [np.zeros(pfns_per_bmap // 8, dtype=np.uint8) for _ in range(nr_bmap)]
    pfn_limit = pfns_per_bmap * nr_bmap
    last_pfn = model.max_pfn
    pfn, ret = 0, 1
    while ret:
        for b in bmaps:
            b.fill(0)
        ret = scan(pfn, pfn + pfn_limit, bmaps, pfns_per_bmap, nr_bmap)
        if ret < 0:
            raise ConfigError("scanner-argument", "the scanner refused its arguments")
        nr_pfn = pfn_limit if ret else last_pfn - pfn
        used = -(-nr_pfn // pfns_per_bmap)
        bufs = tuple(bmaps[i][:(min(pfns_per_bmap, nr_pfn - i * pfns_per_bmap) + 63) // 64 * 8]
                     .tobytes() for i in range(used))
        yield Chunk(request_id, pfn, nr_pfn, 0 if ret else F_DONE, bufs)
        pfn += pfn_limit


def respond(model: BuddyModel, request: bytes, **kw: Any) -> Iterator[Chunk]:
    """The driver's answer to the 16 request bytes the device wrote (spec §4.1).

    Requests for another command or page shift are refused (ConfigError): this model is a
    4 KiB-page guest and knows one command.
    """
    req = REQUEST.unpack(bytes(request))
    if req.cmd != CMD_GET_FREE or req.page_shift != PAGE_SHIFT:
        raise ConfigError("scanner-request", f"request cmd {req.cmd} page_shift "
                          f"{req.page_shift}: this guest answers cmd {CMD_GET_FREE}, "
                          f"page_shift {PAGE_SHIFT}")
    return driver_chunks(model, req.id, **kw)
