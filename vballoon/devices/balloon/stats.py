"""The statistics queue (VIRTIO 1.2 §5.5.6.3).

The driver posts one buffer of ``{le16 tag, le64 val}`` entries; the device reads it and holds
it.  Returning the held buffer asks the driver for fresh statistics; the device does so every
``interval`` seconds while it holds one (its deadline), never while it holds none.
"""
from __future__ import annotations

from vballoon.devices.balloon.context import BalloonContext
from vballoon.devices.balloon.events import Stats, StatsUpdated
from vballoon.virtio.device import ChainBatch
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import Chain, VirtQueue
from vballoon.wire import BALLOON_STAT, C


MAX_STATS_BUFFER = 4096          # bytes: 409 entries, far more than the 16 tags defined
STAT_NAMES = {
    C.VIRTIO_BALLOON_S_SWAP_IN: "swap-in", C.VIRTIO_BALLOON_S_SWAP_OUT: "swap-out",
    C.VIRTIO_BALLOON_S_MAJFLT: "major-faults", C.VIRTIO_BALLOON_S_MINFLT: "minor-faults",
    C.VIRTIO_BALLOON_S_MEMFREE: "free-memory", C.VIRTIO_BALLOON_S_MEMTOT: "total-memory",
    C.VIRTIO_BALLOON_S_AVAIL: "available-memory", C.VIRTIO_BALLOON_S_CACHES: "disk-caches",
    C.VIRTIO_BALLOON_S_HTLB_PGALLOC: "hugetlb-allocations",
    C.VIRTIO_BALLOON_S_HTLB_PGFAIL: "hugetlb-failures",
    C.VIRTIO_BALLOON_S_OOM_KILL: "oom-kills", C.VIRTIO_BALLOON_S_ALLOC_STALL: "alloc-stalls",
    C.VIRTIO_BALLOON_S_ASYNC_SCAN: "async-scans", C.VIRTIO_BALLOON_S_DIRECT_SCAN: "direct-scans",
    C.VIRTIO_BALLOON_S_ASYNC_RECLAIM: "async-reclaims",
    C.VIRTIO_BALLOON_S_DIRECT_RECLAIM: "direct-reclaims",
}   # names as QEMU's guest-stats QOM property uses them ("stat-free-memory" minus "stat-")


class StatsQueue:
    """The stats queue's handler, the held buffer, and the periodic request."""

    def __init__(self, dev: BalloonContext, interval: float = 0.0) -> None:
        self.dev = dev
        self.interval = interval         # seconds between requests (0: never)
        self.stats = Stats()
        self._held: tuple[VirtQueue, Chain] | None = None
        self._held_since = 0.0

    def forget(self) -> None:
        self._held = None

    def queue_stopped(self, vq: VirtQueue) -> None:
        if self._held is not None and self._held[0] is vq:
            self._held = None

    def process(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        glog = self.dev.glog
        batch = ChainBatch(vq, mem)
        for chain in batch:
            # Validate and read the new buffer first: a bad one is returned, and the held one
            # (if any) stays held -- it is never returned twice.
            if chain.writable:
                glog.error("stats-wrong-direction", "queue %d chain %d has device-writable "
                           "buffers; returned", vq.index, chain.head)
                vq.push(chain, 0)
                continue
            size = sum(chain.lens[:chain.nread])
            if size > MAX_STATS_BUFFER:
                glog.error("stats-too-long", "queue %d chain %d is %d bytes (at most %d); "
                           "returned", vq.index, chain.head, size, MAX_STATS_BUFFER)
                vq.push(chain, 0)
                continue
            data = chain.read(mem, limit=MAX_STATS_BUFFER)
            if self._held is not None:
                glog.error("stats-extra-buffer", "queue %d: a second stats buffer while one "
                           "is held; the old one is returned", vq.index)
                old_vq, old = self._held
                self._held = None
                old_vq.push(old, 0)
            chain.forget_hosts()
            self._held, self._held_since = (vq, chain), self.dev.clock()
            self._parse(data)
        return batch.more

    def _parse(self, data: bytes) -> None:
        whole = len(data) - len(data) % BALLOON_STAT.size
        if whole != len(data):
            self.dev.glog.error("stats-truncated", "%d bytes is not a whole number of 10-byte "
                                "entries; the trailing %d bytes are ignored", len(data),
                                len(data) - whole)
        values = {}
        for off in range(0, whole, BALLOON_STAT.size):
            tag, val = BALLOON_STAT.struct.unpack_from(data, off)
            name = STAT_NAMES.get(tag)
            if name is not None:          # the device MUST ignore unknown tags
                values[name] = val
        self.stats = Stats(values, self.dev.clock(), self.stats.count + 1)
        self.dev.emit(StatsUpdated(self.stats))

    def request(self) -> bool:
        """Return the held stats buffer, which asks the driver for fresh stats (§5.5.6.3)."""
        if self._held is None:
            return False
        (vq, chain), self._held = self._held, None
        vq.push(chain, 0)
        self.dev.notify(vq.index)
        return True

    def next_deadline(self) -> float | None:
        if self._held is None or self.interval <= 0:
            return None
        return self._held_since + self.interval

    def handle_timer(self, now: float) -> None:
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            self.request()
