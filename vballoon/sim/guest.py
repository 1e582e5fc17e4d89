"""A guest balloon driver, modelled on Linux's drivers/virtio/virtio_balloon.c.

It negotiates a chosen subset of the offered features, numbers its queues as Linux's
``init_vqs`` does (compacted: absent queues take no index; its own table, not the device's), primes the stats queue, answers config changes by
inflating or deflating in 256-PFN buffers and writing ``actual`` back, answers stats requests,
takes part in free page hint rounds and reports free pages.  Its page allocator is a plain
pool of PFNs above the driver's own memory.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

from vballoon.sim.driver import DriverQueue, GuestRam
from vballoon.sim.frontend import Frontend
from vballoon.sim.scanner import BuddyModel, Chunk, respond
from vballoon.wire import BALLOON_CONFIG, BALLOON_STAT, C, LE32

log = logging.getLogger(__name__)

PAGE = 4096
PFNS_PER_BUFFER = 256          # VIRTIO_BALLOON_ARRAY_PFNS_MAX
REPORT_CAPACITY = 32           # PAGE_REPORTING_CAPACITY
TRANSPORT_BITS = (32, 29, 28)  # VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, _INDIRECT_DESC
# The balloon's feature bits (VIRTIO 1.2 §5.5.3; bit 16: protocol/bitmap-queue.md), by the
# names the daemon's --feature option uses.
FEATURES = {"must-tell-host": 0, "stats": 1, "deflate-on-oom": 2, "free-page-hint": 3,
            "page-poison": 4, "free-page-reporting": 5, "free-page-bitmap": 16}
# Optional queues in the order the driver creates them, each after inflate and deflate when
# its feature was negotiated (Linux init_vqs: VIRTIO_BALLOON_VQ_STATS, _FREE_PAGE, _REPORTING;
# the bitmap queue comes last, protocol/bitmap-queue.md §1).
OPTIONAL_QUEUES = ((1, "stats"), (3, "hint"), (5, "reporting"), (16, "bitmap"))


def queue_order(acked: int) -> list[str]:
    """The queues this driver sets up for ``acked`` features, in index order."""
    return ["inflate", "deflate"] + [role for bit, role in OPTIONAL_QUEUES if acked >> bit & 1]


class PagePool:
    """Pages the guest can give to the balloon, in the order it gives them: pages deflated
    back first (most recent first), then RAM from the top down, as the buddy allocator hands
    out high pages first.  RAM is held as ranges, so a 1 TiB guest costs nothing up front."""

    def __init__(self, ranges: Sequence[range] = (), pages: Sequence[int] = ()) -> None:
        self._front = list(pages)[::-1]      # explicit pages, the next one last
        self._ranges = [r for r in ranges if len(r)]

    def take(self, n: int) -> list[int]:
        """Remove and return the next ``n`` pages (fewer if the pool runs out)."""
        out = self[:n]
        k = min(len(out), len(self._front))
        if k:
            del self._front[-k:]
        rest = len(out) - k
        while rest:
            r = self._ranges[0]
            if rest >= len(r):
                rest -= len(r)
                self._ranges.pop(0)
            else:
                self._ranges[0], rest = r[rest:], 0
        return out

    def __getitem__(self, sl: slice | int):
        if isinstance(sl, int):
            return self[sl:sl + 1][0]
        assert sl.start in (None, 0) and sl.step is None and sl.stop is not None, \
            "pools are read from the front"
        n = sl.stop
        out = self._front[-n:][::-1] if n > 0 else []
        for r in self._ranges:
            if len(out) >= n:
                break
            out.extend(r[:n - len(out)])
        return out

    def give(self, pfns: Sequence[int]) -> None:
        self._front.extend(reversed(pfns))

    def __len__(self) -> int:
        return len(self._front) + sum(len(r) for r in self._ranges)


class BalloonGuest:
    def __init__(self, frontend: Frontend, ram: GuestRam, *,
                 features: Iterable[str] | None = None, queue_size: int = 64,
                 driver_bytes: int = 4 << 20, driver_at: int | None = None) -> None:
        self.fe, self.ram = frontend, ram
        wanted = FEATURES.keys() if features is None else features
        self.wanted = sum(1 << FEATURES[n] for n in wanted) \
            | sum(1 << b for b in TRANSPORT_BITS)
        self.queue_size = queue_size
        self.acked = 0
        self.queues: dict[str, DriverQueue] = {}
        self.actual = 0
        self.poison_val = 0
        self.ballooned: list[int] = []            # pfns in the balloon, in inflate order
        region0 = ram.regions[0]
        # driver memory: ``driver_bytes`` at ``driver_at`` (default: the start of region 0);
        # balloon pages: every page above it
        start = region0.guest_phys_addr if driver_at is None else driver_at
        ram.reserve_driver_memory(start, driver_bytes)
        self.pool = PagePool(self._ram_ranges(start + driver_bytes))
        self.stats_values = {C.VIRTIO_BALLOON_S_MEMFREE: ram.size // 2,
                             C.VIRTIO_BALLOON_S_MEMTOT: ram.size}
        self._stats_buf = 0
        self.stats_requests = 0
        self._pfn_buf = ram.alloc(4 * PFNS_PER_BUFFER, 4)    # vb->pfns, reused per buffer
        self._cmd_bufs = [ram.alloc(4, 4), ram.alloc(4, 4)]  # cmd_id_active, cmd_id_stop
        self._bitmap_req_buf = 0
        self._chunk_buf = 0

    def _ram_ranges(self, skip_below: int) -> list[range]:
        """RAM pages above ``skip_below``, highest first."""
        out = []
        for r in reversed(self.ram.regions):
            lo = max(r.guest_phys_addr, skip_below) // PAGE
            hi = (r.guest_phys_addr + r.memory_size) // PAGE
            if hi > lo:
                out.append(range(hi - 1, lo - 1, -1))
        return out

    def has(self, bit: int) -> bool:
        return bool(self.acked >> bit & 1)

    # -- probe ---------------------------------------------------------------------------

    async def probe(self, *, poison_val: int = 0) -> None:
        """virtballoon_probe + DRIVER_OK: ack features, set up queues, prime stats."""
        self.acked = self.fe.features & self.wanted
        if not self.acked >> C.VIRTIO_F_VERSION_1 & 1:
            raise RuntimeError("the device does not offer VERSION_1")
        roles = queue_order(self.acked)
        ev, ind = self.has(C.VIRTIO_RING_F_EVENT_IDX), self.has(C.VIRTIO_RING_F_INDIRECT_DESC)
        if not self.queues:
            self.queues = {role: DriverQueue(self.ram, i, self.queue_size, event_idx=ev,
                                             indirect=ind) for i, role in enumerate(roles)}
        if self.has(C.VIRTIO_BALLOON_F_PAGE_POISON):
            self.poison_val = poison_val
            await self.write_config()     # the driver writes poison_val before DRIVER_OK
        await self.fe.start(self.ram, self.acked, list(self.queues.values()))
        if "stats" in self.queues:
            self._stats_buf = self._stats_buf or self.ram.alloc(
                BALLOON_STAT.size * C.VIRTIO_BALLOON_S_NR, 8)
            self._post_stats()
        if "bitmap" in self.queues:
            self._bitmap_req_buf = self._bitmap_req_buf or self.ram.alloc(
                C.VIRTIO_BALLOON_BITMAP_REQ_SIZE, 8)
            self.post_bitmap_request()

    async def config(self) -> tuple[int, int, int, int]:
        return tuple(BALLOON_CONFIG.unpack(await self.fe.get_config(BALLOON_CONFIG.size)))

    async def write_config(self) -> None:
        """As QEMU does: the whole config, with the driver's fields updated."""
        num_pages, _, cmd_id, _ = await self.config()
        await self.fe.set_config(BALLOON_CONFIG.pack(num_pages, self.actual, cmd_id,
                                                     self.poison_val))

    # -- inflate / deflate ---------------------------------------------------------------

    async def _send_pfns(self, role: str, pfns: Sequence[int]) -> None:
        q = self.queues[role]
        for i in range(0, len(pfns), PFNS_PER_BUFFER):
            part = np.asarray(pfns[i:i + PFNS_PER_BUFFER], dtype="<u4").tobytes()
            self.ram.at(self._pfn_buf, len(part))[:] = part
            q.add([(self._pfn_buf, len(part), False)])
            q.kick()
            await q.wait_used(1)

    async def inflate(self, npages: int) -> list[int]:
        pfns = self.pool.take(npages)
        await self._send_pfns("inflate", pfns)
        self.ballooned.extend(pfns)
        self.actual += len(pfns)
        await self.write_config()
        return pfns

    async def deflate(self, npages: int) -> list[int]:
        pfns = [self.ballooned.pop() for _ in range(min(npages, len(self.ballooned)))]
        await self._send_pfns("deflate", pfns)
        self.pool.give(pfns)
        self.actual -= len(pfns)
        await self.write_config()
        return pfns

    async def balance(self) -> int:
        """update_balloon_size: move towards the device's num_pages; returns the change."""
        num_pages = (await self.config())[0]
        diff = num_pages - self.actual
        if diff > 0:
            await self.inflate(diff)
        elif diff < 0:
            await self.deflate(-diff)
        return diff

    # -- stats ---------------------------------------------------------------------------

    def _post_stats(self) -> None:
        data = b"".join(BALLOON_STAT.pack(t, v) for t, v in sorted(self.stats_values.items()))
        self.ram.at(self._stats_buf, len(data))[:] = data
        q = self.queues["stats"]
        q.add([(self._stats_buf, len(data), False)])
        q.kick()

    async def answer_stats_request(self, timeout: float = 5.0) -> None:
        """Wait for the device to return the stats buffer, then send fresh stats."""
        await self.queues["stats"].wait_used(1, timeout)
        self.stats_requests += 1
        self._post_stats()

    # -- free page reporting ---------------------------------------------------------------

    async def report(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Report (gpa, len) ranges of free memory, up to 32 per chain, each chain used."""
        q = self.queues["reporting"]
        for i in range(0, len(ranges), REPORT_CAPACITY):
            q.add([(gpa, n, True) for gpa, n in ranges[i:i + REPORT_CAPACITY]])
            q.kick()
            await q.wait_used(1)

    # -- free page hinting -----------------------------------------------------------------

    async def hint(self, cmd_id: int, blocks: Sequence[tuple[int, int]]) -> None:
        """One round as Linux sends it: cmd_id, one in-buffer per block, then STOP."""
        q = self.queues["hint"]
        self._cmd(q, 0, cmd_id)
        for gpa, n in blocks:
            q.add([(gpa, n, True)])
        self._cmd(q, 1, C.VIRTIO_BALLOON_CMD_ID_STOP)
        q.kick()
        await q.wait_used(len(blocks) + 2)

    def _cmd(self, q: DriverQueue, which: int, value: int) -> None:
        buf = self._cmd_bufs[which]
        self.ram.at(buf, 4)[:] = LE32.pack(value)
        q.add([(buf, 4, False)])

    # -- the free-page-bitmap queue (protocol/bitmap-queue.md) --------------------------------

    def post_bitmap_request(self) -> None:
        """Post the device-writable request buffer the device answers a round with (§4.1)."""
        q = self.queues["bitmap"]
        q.add([(self._bitmap_req_buf, C.VIRTIO_BALLOON_BITMAP_REQ_SIZE, True)])
        q.kick()

    async def answer_bitmap_request(self, model: BuddyModel, timeout: float = 10.0, *,
                                    chunks: Iterable[Chunk] | None = None) -> int:
        """Wait for a request, scan ``model`` and send the chunks, one chain at a time, each
        waited for (as the seed's driver did); then post the request buffer again.
        ``chunks``, if given, are sent instead of scanning (benchmarks prepare them ahead).
        Returns the number of chunks sent."""
        q = self.queues["bitmap"]
        await q.wait_used(1, timeout)
        request = bytes(self.ram.at(self._bitmap_req_buf, C.VIRTIO_BALLOON_BITMAP_REQ_SIZE))
        if not self._chunk_buf:
            self._chunk_buf = self.ram.alloc(
                C.VIRTIO_BALLOON_BITMAP_CHUNK_HDR_SIZE
                + C.VIRTIO_BALLOON_BITMAP_MAX_BMAPS * C.VIRTIO_BALLOON_BITMAP_BMAP_BYTES, 64)
        sent = 0
        for chunk in respond(model, request) if chunks is None else chunks:
            bufs, at = [], self._chunk_buf
            for data in chunk.buffers():
                self.ram.at(at, len(data))[:] = data
                bufs.append((at, len(data), False))
                at += len(data)
            q.add(bufs)
            q.kick()
            await q.wait_used(1, timeout)
            sent += 1
        self.post_bitmap_request()
        return sent

    # -- the driver's main loop ------------------------------------------------------------

    async def run(self) -> None:
        """React to config changes as the kernel's work items do, until cancelled."""
        while True:
            await self.fe.wait_config_change(timeout=None)
            await self.balance()

    def close(self) -> None:
        for q in self.queues.values():
            q.close()
        self.queues = {}
