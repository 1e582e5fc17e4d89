"""Inflate and deflate (VIRTIO 1.2 §5.5.6.2): the pages in the balloon, and discarding them.

Inflated pages are discarded from the guest RAM file before the buffer is returned (the device
MAY modify an inflated page once it has seen its PFN, §5.5.6.2.1), one discard call per
contiguous range.  Deflated pages need nothing from the device: the guest takes them back and
the host backs them again on first touch.

Which pages are in the balloon is kept per RAM extent (:class:`PageSet`), so the cost follows
the RAM the guest has, not the highest address in its layout.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np

from vballoon.virtio.device import ChainBatch
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import Chain, VirtQueue
from vballoon.wire import C

if TYPE_CHECKING:
    from vballoon.devices.balloon.device import Balloon

PFN_SHIFT = C.VIRTIO_BALLOON_PFN_SHIFT
PAGE = 1 << PFN_SHIFT
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
        """Add (or remove) valid ``pfns``; returns those whose membership changed."""
        pfns = np.unique(pfns.astype(np.int64))
        changed = []
        for (lo, hi), bits in zip(self.extents, self._bits):
            p = pfns[(pfns >= lo) & (pfns < hi)] - lo
            if not p.size:
                continue
            byte, bit = p >> 3, (1 << (p & 7)).astype(np.uint8)
            was = (bits[byte] & bit) != 0
            ch = p[was != value]
            byte, bit = ch >> 3, (1 << (ch & 7)).astype(np.uint8)
            if value:
                np.bitwise_or.at(bits, byte, bit)
            else:
                np.bitwise_and.at(bits, byte, ~bit)
            changed.append(ch + lo)
        return np.concatenate(changed) if changed else np.zeros(0, dtype=np.int64)

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

    def __init__(self, dev: "Balloon") -> None:
        self.dev = dev
        self.pages = PageSet()

    def memory_changed(self, mem: GuestMemory | None) -> None:
        if mem is not None:
            self.pages.set_extents((g >> PFN_SHIFT, (g + s) >> PFN_SHIFT)
                                   for g, s in mem.ram_ranges)

    def driver_restarted(self) -> None:
        self.pages.clear()
        self.dev.counters.inflated_pages = 0

    def _pfns(self, vq: VirtQueue, mem: GuestMemory, chain: Chain, role: str) -> np.ndarray:
        """The valid le32 PFNs of an inflate/deflate buffer (invalid ones logged, dropped)."""
        glog = self.dev.glog
        if chain.writable:
            glog.error(f"{role}-wrong-direction", "queue %d chain %d has device-writable "
                       "buffers; ignored", vq.index, chain.head)
            return np.zeros(0, dtype=np.int64)
        data = chain.read(mem, limit=MAX_PFN_BUFFER)
        if len(data) % 4:
            glog.error(f"{role}-length", "queue %d chain %d is %d bytes, not a multiple of 4; "
                       "ignored", vq.index, chain.head, len(data))
            return np.zeros(0, dtype=np.int64)
        pfns = np.frombuffer(data, dtype="<u4").astype(np.int64)
        ok = self.pages.valid(pfns)
        if not ok.all():
            bad = pfns[~ok]
            glog.error(f"{role}-pfn-outside-ram", "%d pfn(s) outside guest RAM (first %#x); "
                       "ignored", bad.size, int(bad[0]))
            pfns = pfns[ok]
        return pfns

    def process_inflate(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        chains, new = [], []
        batch = ChainBatch(vq, mem)
        try:
            for chain in batch:
                chains.append(chain)
                new.append(self.pages.update(self._pfns(vq, mem, chain, "inflate"), True))
        finally:
            # Even if a later chain broke the queue: the pages already recorded are
            # discarded and their buffers returned.
            pfns = np.concatenate(new) if new else np.zeros(0, dtype=np.int64)
            self.dev.counters.inflated_pages += int(pfns.size)
            # The device MAY modify an inflated page once it has seen the PFN
            # (§5.5.6.2.1): discard before the buffers are returned.
            self.dev.discard(mem, pfn_runs(pfns))
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


def pfn_runs(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique pfns -> (first pfn, count) of maximal contiguous runs, ascending."""
    p = np.sort(pfns.astype(np.int64))
    if p.size == 0:
        return p, p
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    first = np.concatenate(([0], breaks))
    return p[first], np.diff(np.concatenate((first, [p.size])))
