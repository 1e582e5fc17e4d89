"""Inflate benchmark (issue 3): 1 GiB of 4 KiB pages in 256-PFN buffers through the loopback
front-end, against a one-call-per-page discard loop over the same pages, measured in one run.

    python benchmarks/bench_inflate.py [--size 1G] [--repeat 3]

For each PFN order (contiguous, scattered) it prints pages/s and discard calls for the daemon's
path (guest driver -> vhost-user -> inflate queue -> coalesced MADV_REMOVE) and for the baseline
(one MADV_REMOVE per page, what QEMU does with 4 KiB host pages, without any queue overhead),
and the ratios; then the same for the device side alone (the time in the device's inflate
handler: walk, PFN checks, discard), which leaves out the loopback guest driver's own Python
cost.  Every run starts from guest RAM whose pages are all touched through a mapping,
so each discard frees and unmaps memory.  The kernel's cost of freeing a page bounds the ratio:
on the reference machine a 1 MiB MADV_REMOVE frees ~1.4 M pages/s and a 4 KiB one ~0.25 M/s.
"""
from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import random
import tempfile
import time

import numpy as np

from vballoon.devices.balloon.device import Balloon
from vballoon.units import parse_size
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest, PagePool
from vballoon.vhost.transport import Server

PAGE = 4096


def populate(mm: mmap.mmap) -> None:
    """Touch every page through the mapping, as a guest running in QEMU would: the pages are
    allocated and mapped, so each discard also unmaps them (as it does in QEMU)."""
    np.frombuffer(mm, dtype=np.uint8)[::PAGE] = 1


class TimedBalloon(Balloon):
    """The device, with the time spent in its inflate handler summed up (the device side)."""

    device_time = 0.0

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        inner = self.handlers["inflate"]

        def timed(vq, mem):
            t = time.perf_counter()
            try:
                return inner(vq, mem)
            finally:
                self.device_time += time.perf_counter() - t
        self.handlers["inflate"] = timed


class PerPageBalloon(TimedBalloon):
    """The same device with QEMU's discard strategy for 4 KiB host pages: one call per page."""

    def discard(self, mem, runs):
        starts, counts = runs
        pages = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)] or [[]])
        return super().discard(mem, (pages.astype(np.int64), np.ones(pages.size, np.int64)))


async def daemon_inflate(size: int, scattered: bool, per_page: bool = False
                         ) -> tuple[float, int, float]:
    ram = GuestRam(size + (8 << 20))
    path = os.path.join(tempfile.mkdtemp(), "vb.sock")
    device = (PerPageBalloon if per_page else TimedBalloon)(["stats"])
    srv = Server(path, device)
    srv.start()
    fe = await Frontend.connect(path)
    await fe.init(device.max_queues())
    guest = BalloonGuest(fe, ram, features=[], queue_size=256)
    await guest.probe()
    npages = size // PAGE
    pool = guest.pool[:npages]
    if scattered:
        random.Random(1).shuffle(pool)
    guest.pool = PagePool(pages=pool)
    populate(ram.mm)
    before = ram.allocated_bytes
    t = time.perf_counter()
    await guest.inflate(npages)
    dt = time.perf_counter() - t
    freed = before - ram.allocated_bytes
    calls = device.counters.discard_calls
    await fe.close()
    guest.close()
    await srv.close()
    ram.close()
    os.rmdir(os.path.dirname(path))
    assert freed >= size, f"only {freed} of {size} bytes were reclaimed"
    return dt, calls, device.device_time


def per_page_discard(size: int, scattered: bool) -> tuple[float, int, int]:
    fd = os.memfd_create("baseline")
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size)
    populate(mm)
    pages = list(range(size // PAGE))
    if scattered:
        random.Random(1).shuffle(pages)
    before = os.fstat(fd).st_blocks * 512
    t = time.perf_counter()
    for p in pages:
        mm.madvise(mmap.MADV_REMOVE, p * PAGE, PAGE)
    dt = time.perf_counter() - t
    freed = before - os.fstat(fd).st_blocks * 512
    mm.close()
    os.close(fd)
    assert freed >= size, f"only {freed} of {size} bytes were reclaimed"
    return dt, len(pages), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="bytes to inflate (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    args = ap.parse_args()
    size = parse_size(args.size)
    npages = size // PAGE
    print(f"inflate {size >> 20} MiB = {npages} pages in 256-pfn buffers, best of {args.repeat}")
    def best(f, *a):
        return min((f(*a) for _ in range(args.repeat)), key=lambda r: r[0])

    print(f"{'':11s} {'vballoon (coalesced)':>31s} | {'same path, 1 call/page':>31s} |"
          f" {'bare 1 call/page loop':>31s}")
    for scattered in (False, True):
        name = "scattered" if scattered else "contiguous"
        ours = best(lambda: asyncio.run(daemon_inflate(size, scattered)))
        same = best(lambda: asyncio.run(daemon_inflate(size, scattered, True)))
        bare = best(per_page_discard, size, scattered)
        cols = " | ".join(f"{npages / r[0]:11,.0f} pages/s {r[1]:7d} calls" for r in (ours, same, bare))
        print(f"{name:11s} {cols} | x{same[0] / ours[0]:.2f} vs same path,"
              f" x{bare[0] / ours[0]:.2f} vs bare loop")
        print(f"{'':11s} device side only (the inflate handler, guest driver excluded): "
              f"{npages / ours[2]:,.0f} pages/s vs {npages / same[2]:,.0f} one call per page"
              f" (x{same[2] / ours[2]:.2f}) vs bare loop {npages / bare[2]:,.0f}"
              f" (x{bare[2] / ours[2]:.2f})")


if __name__ == "__main__":
    main()
