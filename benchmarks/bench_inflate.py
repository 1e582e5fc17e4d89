"""Inflate benchmark (issues 3, 14): 1 GiB of 4 KiB pages in 256-PFN buffers through the loopback
front-end, against baselines measured in the same run on the same kind of pages.

    python benchmarks/bench_inflate.py [--size 1G] [--repeat 3]
    python benchmarks/bench_inflate.py --smoke          # tiny, one repeat (CI: it still runs)

Baselines (each over a memfd whose pages were all touched through a mapping, as in QEMU):

* **kernel limit**: ONE ``MADV_REMOVE`` over all the populated pages -- the fastest the kernel
  frees them; no coalescing can beat it;
* **bare loop**: one ``MADV_REMOVE`` per page from a Python loop, no queue at all (what a
  naive device does with 4 KiB host pages).

The daemon's path: guest driver -> vhost-user -> inflate queue -> runs merged across every chain
of one handler call -> discards -> buffers returned.  Two drivers:

* **batched**: the driver posts as many 256-PFN buffers as the queue holds, kicks once and
  waits for them all (a driver with a deep pipeline);
* **linux**: Linux's own driver (``tell_host``): one buffer, kick, wait until it is used.
  Nothing can be merged across buffers there (the device never holds a buffer), so each
  discard is at most 256 pages: the kernel's 1 MiB rate bounds it.

"device side" is the time in the device's inflate handler (walk, PFN checks, discard), which
leaves out the in-process guest driver's own Python cost.  Every figure is a ratio to a baseline
of the same run.
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
from vballoon.sim.guest import BalloonGuest
from vballoon.vhost.transport import Server

PAGE = 4096
PFNS_PER_BUFFER = 256
QUEUE_SIZE = 256


def populate(mm: mmap.mmap) -> None:
    """Touch every page through the mapping, as a guest running in QEMU would: the pages are
    allocated and mapped, so each discard also unmaps them (as it does in QEMU)."""
    np.frombuffer(mm, dtype=np.uint8)[::PAGE] = 1


def timed_balloon() -> Balloon:
    """The device, with the time spent in its inflate handler summed up in ``device_time``
    (through the public handler table)."""
    dev = Balloon(["stats"])
    dev.device_time = 0.0
    inner = dev.handlers["inflate"]

    def timed(vq, mem):
        t = time.perf_counter()
        try:
            return inner(vq, mem)
        finally:
            dev.device_time += time.perf_counter() - t
    dev.handlers["inflate"] = timed
    dev.discard_time = 0.0
    discard = dev.discard

    def timed_discard(mem, runs):
        t = time.perf_counter()
        try:
            return discard(mem, runs)
        finally:
            dev.discard_time += time.perf_counter() - t
    dev.discard = timed_discard
    return dev


async def send_batched(guest: BalloonGuest, ram: GuestRam, pfns: np.ndarray) -> None:
    """Post up to QUEUE_SIZE buffers of 256 pfns, kick once, wait for all; repeat."""
    q = guest.queues["inflate"]
    bufs = [ram.alloc(4 * PFNS_PER_BUFFER, 4) for _ in range(QUEUE_SIZE)]
    per_kick = QUEUE_SIZE * PFNS_PER_BUFFER
    for i in range(0, len(pfns), per_kick):
        part = pfns[i:i + per_kick]
        n = 0
        for j in range(0, len(part), PFNS_PER_BUFFER):
            data = part[j:j + PFNS_PER_BUFFER].astype("<u4").tobytes()
            ram.at(bufs[n], len(data))[:] = data
            q.add([(bufs[n], len(data), False)])
            n += 1
        q.kick()
        await q.wait_used(n, timeout=60)


async def daemon_inflate(size: int, scattered: bool, driver: str
                         ) -> tuple[float, int, float, float]:
    """(wall seconds, discard calls, device seconds, seconds in the discard calls) of
    inflating ``size`` bytes."""
    ram = GuestRam(size + (8 << 20))
    path = os.path.join(tempfile.mkdtemp(), "vb.sock")
    device = timed_balloon()
    srv = Server(path, device)
    srv.start()
    fe = await Frontend.connect(path)
    try:
        await fe.init(device.max_queues())
        guest = BalloonGuest(fe, ram, features=[], queue_size=QUEUE_SIZE)
        await guest.probe()
        npages = size // PAGE
        pfns = np.array(guest.pool[:npages], dtype=np.int64)
        if scattered:
            np.random.default_rng(1).shuffle(pfns)
        populate(ram.mm)
        before = ram.allocated_bytes
        t = time.perf_counter()
        if driver == "batched":
            await send_batched(guest, ram, pfns)
        else:
            guest.pool = type(guest.pool)(pages=[int(p) for p in pfns])
            await guest.inflate(npages)
        dt = time.perf_counter() - t
        freed = before - ram.allocated_bytes
        calls = device.counters.discard_calls
        guest.close()
    finally:
        await fe.close()
        await srv.close()
        ram.close()
        os.rmdir(os.path.dirname(path))
    assert freed >= size, f"only {freed} of {size} bytes were reclaimed"
    return dt, calls, device.device_time, device.discard_time


def _populated(size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("baseline")
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size)
    populate(mm)
    return fd, mm


def kernel_limit(size: int, scattered: bool) -> tuple[float, int, float]:
    """One MADV_REMOVE over every populated page: the kernel's own limit."""
    fd, mm = _populated(size)
    before = os.fstat(fd).st_blocks * 512
    t = time.perf_counter()
    mm.madvise(mmap.MADV_REMOVE, 0, size)
    dt = time.perf_counter() - t
    freed = before - os.fstat(fd).st_blocks * 512
    mm.close()
    os.close(fd)
    assert freed >= size, f"only {freed} of {size} bytes were reclaimed"
    return dt, 1, dt, dt


def per_page_discard(size: int, scattered: bool) -> tuple[float, int, float]:
    """One MADV_REMOVE per page from a bare Python loop (no queue)."""
    fd, mm = _populated(size)
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
    return dt, len(pages), dt, dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="bytes to inflate (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    ap.add_argument("--smoke", action="store_true", help="8 MiB, one repeat: checks it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.repeat = "8M", 1
    size = parse_size(args.size)
    npages = size // PAGE

    print(f"inflate {size >> 20} MiB = {npages} pages in {PFNS_PER_BUFFER}-pfn buffers, "
          f"queue of {QUEUE_SIZE}, best of {args.repeat} (runs interleaved: the machine is "
          "shared)")
    for scattered in (False, True):
        name = "scattered" if scattered else "contiguous"
        runs: dict[str, list] = {"limit": [], "bare": [], "batched": [], "linux": []}
        for _ in range(args.repeat):        # interleaved, so that load hits all alike
            runs["limit"].append(kernel_limit(size, scattered))
            runs["bare"].append(per_page_discard(size, scattered))
            for driver in ("batched", "linux"):
                runs[driver].append(asyncio.run(daemon_inflate(size, scattered, driver)))
        limit, bare = (min(r[0] for r in runs[k]) for k in ("limit", "bare"))
        print(f"{name}: kernel limit (one MADV_REMOVE over all pages) {npages / limit:,.0f} "
              f"pages/s; bare 1-call-per-page loop {npages / bare:,.0f} pages/s")
        for driver in ("batched", "linux"):
            wall, calls, dev, disc = min(runs[driver], key=lambda r: r[2])
            target = ""
            if driver == "batched":
                target = (" (target >= 0.8x kernel limit)" if not scattered
                          else " (target >= 1.0x bare loop)")
            print(f"  {driver:7s} driver: device side {npages / dev:11,.0f} pages/s = "
                  f"x{limit / dev:.2f} kernel limit, x{bare / dev:.2f} bare loop{target}; "
                  f"{calls} discard calls taking {disc / dev:.0%} of it; end to end "
                  f"{npages / wall:,.0f} pages/s (x{bare / wall:.2f} bare loop)")


if __name__ == "__main__":
    main()
