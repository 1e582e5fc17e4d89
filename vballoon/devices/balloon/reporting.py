"""Free page reporting (VIRTIO 1.2 §5.5.6.5): reported pages are discarded (coalesced, one
call per contiguous range) and the buffers returned.  Not while ``poison_val`` is non-zero:
discarded pages read back as zero, not as the poison value."""
from __future__ import annotations

import numpy as np

from vballoon.devices.balloon.context import BalloonContext
from vballoon.virtio.device import ChainBatch
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import VirtQueue
from vballoon.units import FRAME as PAGE




class ReportingQueue:
    def __init__(self, dev: BalloonContext) -> None:
        self.dev = dev

    def process(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        """Every available reporting chain of this call (at most the batch): their ranges are
        merged across buffers and chains, discarded (one call per run and region), and only
        then are the buffers returned.  No buffer is held past this call."""
        dev = self.dev
        poisoned = dev.config.poison_val != 0
        chains, addrs, lens = [], [], []
        batch = ChainBatch(vq, mem)
        try:
            for chain in batch:
                chains.append(chain)
                if chain.readable:
                    dev.glog.error("reporting-wrong-direction", "queue %d chain %d has "
                                   "device-readable buffers; nothing discarded", vq.index,
                                   chain.head)
                    continue
                for b in chain.writable:
                    addrs.append(b.addr)
                    lens.append(b.len)
        finally:
            try:
                if lens:
                    a = np.array(addrs, dtype=np.uint64)
                    n = np.array(lens, dtype=np.uint64)
                    dev.counters.reported_bytes += int(n.sum())
                    first = (a + np.uint64(PAGE - 1)) // np.uint64(PAGE)   # whole pages only
                    last = (a + n) // np.uint64(PAGE)
                    whole = last > first
                    if not poisoned and whole.any():
                        dev.discard(mem, merge_run_arrays(first[whole].astype(np.int64),
                                                          (last - first)[whole].astype(np.int64)))
            finally:
                for chain in chains:
                    vq.push(chain, 0)
        return batch.more


def merge_run_arrays(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coalesce adjacent or overlapping runs (``starts[i]``, ``counts[i]`` pages; any order,
    counts > 0) into ascending (first pfn, count) arrays of disjoint, non-adjacent runs."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = starts + np.asarray(counts, dtype=np.int64)
    if starts.size == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    # a run starts a new merged run when it begins past everything before it
    new = np.concatenate(([True], starts[1:] > reach[:-1]))
    first = np.flatnonzero(new)
    last = np.concatenate((first[1:], [starts.size])) - 1
    return starts[first], reach[last] - starts[first]


def merge_runs(runs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Coalesce adjacent or overlapping (pfn, n) runs into (first pfn, count) arrays."""
    runs = [(p, n) for p, n in runs if n > 0]
    if not runs:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy()
    arr = np.array(runs, dtype=np.int64).reshape(-1, 2)
    return merge_run_arrays(arr[:, 0], arr[:, 1])
