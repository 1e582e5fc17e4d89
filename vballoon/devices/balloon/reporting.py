"""Free page reporting (VIRTIO 1.2 §5.5.6.5): reported pages are discarded (coalesced, one
call per contiguous range) and the buffers returned.  Not while ``poison_val`` is non-zero:
discarded pages read back as zero, not as the poison value."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vballoon.virtio.device import ChainBatch
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import VirtQueue
from vballoon.wire import C

if TYPE_CHECKING:
    from vballoon.devices.balloon.device import Balloon

PAGE = 1 << C.VIRTIO_BALLOON_PFN_SHIFT


class ReportingQueue:
    def __init__(self, dev: "Balloon") -> None:
        self.dev = dev

    def process(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        dev = self.dev
        poisoned = dev.config.poison_val != 0
        batch = ChainBatch(vq, mem)
        for chain in batch:
            if chain.readable:
                dev.glog.error("reporting-wrong-direction", "queue %d chain %d has "
                               "device-readable buffers; nothing discarded", vq.index, chain.head)
                vq.push(chain, 0)
                continue
            runs = []
            for b in chain.writable:
                first, last = -(-b.addr // PAGE), (b.addr + b.len) // PAGE
                if last > first:
                    runs.append((first, last - first))
                dev.counters.reported_bytes += b.len
            if not poisoned:
                dev.discard(mem, merge_runs(runs))
            vq.push(chain, 0)
        return batch.more


def merge_runs(runs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Coalesce adjacent or overlapping (pfn, n) runs into (first pfn, count) arrays."""
    out: list[list[int]] = []
    for pfn, n in sorted(runs):
        if out and pfn <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], pfn + n - out[-1][0])
        else:
            out.append([pfn, n])
    arr = np.array(out, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]
