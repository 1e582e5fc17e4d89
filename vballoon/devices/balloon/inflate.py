"""Inflate and deflate (VIRTIO 1.2 §5.5.6.2): the pages in the balloon, and discarding them.

Inflated pages are discarded from the guest RAM file before the buffer is returned (the device
MAY modify an inflated page once it has seen its PFN, §5.5.6.2.1), one discard call per
contiguous range.  Deflated pages need nothing from the device: the guest takes them back and
the host backs them again on first touch.

Which pages are in the balloon is kept per RAM extent (:class:`PageSet`), so the cost follows
the RAM the guest has, not the highest address in its layout.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from vballoon.devices.balloon.context import BalloonContext
from vballoon.virtio._vring import ffi as _ffi, lib as _lib
from vballoon.virtio.device import ChainBatch
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import Chain, VirtQueue
from vballoon.units import FRAME_SHIFT as PFN_SHIFT


MAX_PFN_BUFFER = 1 << 16     # bytes of one inflate/deflate buffer (16k pfns)


class PageSet:
    """A set of pfns inside RAM extents ``[(lo, hi), ...)``: one bitmap per extent."""

    def __init__(self) -> None:
        self.extents: list[tuple[int, int]] = []
        self._bits: list[np.ndarray] = []          # uint8, bit k = pfn lo + k

    def set_extents(self, extents: Iterable[tuple[int, int]]) -> None:
        """New RAM extents: pfns still inside one stay in the set, the others leave it."""
        old = self.pfns()
        self.extents = sorted((lo, hi) for lo, hi in extents if hi > lo)
        self._bits = [np.zeros((hi - lo + 7) // 8, dtype=np.uint8) for lo, hi in self.extents]
        if old.size:
            self.update(old[self.valid(old)], True)

    def valid(self, pfns: np.ndarray) -> np.ndarray:
        """A mask of the ``pfns`` inside an extent."""
        ok = np.zeros(pfns.shape, dtype=bool)
        for lo, hi in self.extents:
            ok |= (pfns >= lo) & (pfns < hi)
        return ok

    def update(self, pfns: np.ndarray, value: bool) -> np.ndarray:
        """Add (or remove) valid ``pfns``; returns those whose membership changed, ascending.

        One C pass per extent over the whole array (``vq_bits_update``): nothing per page in
        Python; duplicates change nothing the second time."""
        pfns = np.ascontiguousarray(pfns, dtype=np.int64)
        out = np.empty(pfns.size, dtype=np.int64)
        if not pfns.size:
            return out
        m = 0
        src = _ffi.from_buffer("int64_t[]", pfns)
        for (lo, hi), bits in zip(self.extents, self._bits):
            with _ffi.from_buffer("uint8_t[]", bits, require_writable=True) as b, \
                    _ffi.from_buffer("int64_t[]", out[m:], require_writable=True) as dst:
                m += int(_lib.vq_bits_update(b, lo, hi, src, pfns.size, int(bool(value)), dst))
        changed = out[:m]
        changed.sort()
        return changed

    def pfns(self) -> np.ndarray:
        """Every pfn in the set, ascending (int64)."""
        parts = [np.flatnonzero(np.unpackbits(bits, bitorder="little")) + lo
                 for (lo, _), bits in zip(self.extents, self._bits) if bits.any()]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def count(self) -> int:
        return int(sum(int(np.unpackbits(b).sum()) for b in self._bits if b.any()))

    def any(self) -> bool:
        return any(bool(b.any()) for b in self._bits)

    def clear(self) -> None:
        for b in self._bits:
            b.fill(0)

    def bitmap(self, max_pfn: int | None = None) -> np.ndarray:
        """The set as one uint8 bitmap over ``[0, max_pfn)`` (bit p = pfn p), a new array."""
        end = max((hi for _, hi in self.extents), default=0) if max_pfn is None else max_pfn
        out = np.zeros((end + 7) // 8, dtype=np.uint8)
        p = self.pfns()
        p = p[p < end]
        np.bitwise_or.at(out, p >> 3, (1 << (p & 7)).astype(np.uint8))
        return out


class InflateDeflate:
    """The inflate and deflate queues' handlers and the set of ballooned pages."""

    def __init__(self, dev: BalloonContext) -> None:
        self.dev = dev
        self.pages = PageSet()

    def memory_changed(self, mem: GuestMemory | None) -> None:
        if mem is not None:
            self.pages.set_extents((g >> PFN_SHIFT, (g + s) >> PFN_SHIFT)
                                   for g, s in mem.ram_ranges)

    def driver_restarted(self) -> None:
        self.pages.clear()
        self.dev.counters.inflated_pages = 0

    def _raw(self, vq: VirtQueue, mem: GuestMemory, chain: Chain, role: str) -> bytes:
        """The le32 PFN bytes of an inflate/deflate buffer (a wrong one logged, b"")."""
        glog = self.dev.glog
        if chain.writable:
            glog.error(f"{role}-wrong-direction", "queue %d chain %d has device-writable "
                       "buffers; ignored", vq.index, chain.head)
            return b""
        data = chain.read(mem, limit=MAX_PFN_BUFFER)
        if len(data) % 4:
            glog.error(f"{role}-length", "queue %d chain %d is %d bytes, not a multiple of 4; "
                       "ignored", vq.index, chain.head, len(data))
            return b""
        return data

    def _valid(self, data: bytes, role: str) -> np.ndarray:
        """The PFNs in ``data`` (le32, any number of buffers concatenated) inside guest RAM;
        the others are logged and dropped."""
        pfns = np.frombuffer(data, dtype="<u4").astype(np.int64)
        ok = self.pages.valid(pfns)
        if not ok.all():
            bad = pfns[~ok]
            self.dev.glog.error(f"{role}-pfn-outside-ram", "%d pfn(s) outside guest RAM "
                                "(first %#x); ignored", bad.size, int(bad[0]))
            pfns = pfns[ok]
        return pfns

    def _pfns(self, vq: VirtQueue, mem: GuestMemory, chain: Chain, role: str) -> np.ndarray:
        """The valid le32 PFNs of an inflate/deflate buffer (invalid ones logged, dropped)."""
        return self._valid(self._raw(vq, mem, chain, role), role)

    def process_inflate(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        """Every available inflate chain of this call (at most the batch): their PFNs are
        merged into runs across buffer boundaries, discarded (one call per run and region),
        and only then are the buffers returned -- the device MAY modify an inflated page once
        it has seen its PFN (§5.5.6.2.1), and under MUST_TELL_HOST the driver does not touch
        the pages before the buffer is used.  No buffer is held past this call."""
        chains, raw = [], []
        batch = ChainBatch(vq, mem)
        try:
            for chain in batch:
                chains.append(chain)
                raw.append(self._raw(vq, mem, chain, "inflate"))
        finally:
            # Even if a later chain broke the queue: the pages already read are recorded,
            # discarded, and their buffers returned.
            try:
                pfns = self._valid(b"".join(raw), "inflate") if raw else None
                if pfns is not None and pfns.size:
                    new = self.pages.update(pfns, True)   # ascending, not yet in the balloon
                    self.dev.counters.inflated_pages += int(new.size)
                    self.dev.discard(mem, sorted_runs(new))
            finally:
                for chain in chains:
                    vq.push(chain, 0)
        return batch.more

    def process_deflate(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        batch = ChainBatch(vq, mem)
        for chain in batch:
            try:
                pfns = self._pfns(vq, mem, chain, "deflate")
            except BaseException:
                vq.push(chain, 0)
                raise
            gone = self.pages.update(pfns, False)
            if gone.size != np.unique(pfns).size:
                self.dev.glog.warning("deflate-not-inflated", "%d pfn(s) deflated that were "
                                      "not in the balloon", np.unique(pfns).size - gone.size)
            self.dev.counters.inflated_pages -= int(gone.size)
            vq.push(chain, 0)
        return batch.more


def unique_sorted(pfns: np.ndarray) -> np.ndarray:
    """``pfns`` as int64, sorted, without duplicates (``np.unique`` without its overheads)."""
    p = np.sort(np.asarray(pfns).astype(np.int64, copy=False))
    if p.size > 1:
        dup = p[1:] == p[:-1]
        if dup.any():
            p = p[np.concatenate(([True], ~dup))]
    return p


def sorted_runs(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending unique pfns -> (first pfn, count) of maximal contiguous runs."""
    if p.size == 0:
        return p, p
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    first = np.concatenate(([0], breaks))
    return p[first], np.diff(np.concatenate((first, [p.size])))


def pfn_runs(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique pfns -> (first pfn, count) of maximal contiguous runs, ascending."""
    return sorted_runs(np.sort(np.asarray(pfns).astype(np.int64)))
