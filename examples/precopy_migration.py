#!/usr/bin/env python3
"""A custom pre-copy migration of a guest's RAM that skips the pages the guest reports free.

This is the contract a migration engine follows to use vballoon's map (protocol/bitmap-queue.md §7, "the
correctness contract"): every page the map reports free was free at *some* moment between the
request and the response -- not necessarily now.  So:

1. start dirty tracking (the engine's own: KVM's dirty log, userfaultfd write-protection...);
2. ask the daemon for a free-page round over its control socket, wait for it, read the ranges;
3. copy every RAM page except the free ones;
4. resend every page the dirty log caught (iteratively, then once more with the guest paused);
5. the destination now holds every page the guest uses.  A page the guest allocated after
   reporting it free is in the dirty log: step 4 sends it.

Everything below the migration engine is the project's loopback rig, with no QEMU: the daemon
serves a real vhost-user socket, the front-end shares guest RAM as a memfd, and the "guest" is
the reference driver answering from a model of a Linux buddy allocator after a memory-hungry
workload exited.  The guest is simulated in this process, so its writes go through a dirty log
here (in a real VM the MMU does that); it keeps running during the migration: it allocates
free pages and rewrites used ones before its scan, and allocates pages the map had just
reported free after it.  The engine reads the source RAM through the memfd and writes a
second memfd, the destination; at the end it compares them byte for byte.

Run:  python3 examples/precopy_migration.py [--memory 2G] [--seed 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

import numpy as np

from vballoon.app.daemon import Daemon
from vballoon.control.client import AsyncClient
from vballoon.fpmap.export import read_export
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.sim.scanner import BuddyModel
from vballoon.units import FRAME as PAGE, GiB, MiB, parse_size
DRIVER_AT, DRIVER_BYTES = 16 * MiB, 4 * MiB      # the guest driver's rings and buffers
BATCH = 1 << 14                                   # pages per copy


def size(n: float) -> str:
    if n == 0:
        return "0"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


class Memory:
    """Guest RAM as pages: pfn -> the page's bytes in the memfd (regions are back to back)."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram
        self.pages = np.frombuffer(ram.view, dtype=np.uint8).reshape(-1, PAGE)

    def release(self) -> None:
        """Drop the view, so that the memfd's mapping can be closed."""
        del self.pages

    def index(self, pfns: np.ndarray) -> np.ndarray:
        out = np.full(len(pfns), -1, dtype=np.int64)
        for r in self.ram.regions:
            lo, n = r.guest_phys_addr // PAGE, r.memory_size // PAGE
            inside = (pfns >= lo) & (pfns < lo + n)
            out[inside] = pfns[inside] - lo + r.mmap_offset // PAGE
        assert (out >= 0).all(), "a pfn outside guest RAM"
        return out


class DirtyLog:
    """The migration engine's dirty tracking: pages written since :meth:`start`."""

    def __init__(self, max_pfn: int) -> None:
        self.dirty = np.zeros(max_pfn, dtype=bool)
        self.on = False

    def start(self) -> None:
        self.dirty[:] = False
        self.on = True

    def mark(self, pfns: np.ndarray) -> None:
        if self.on:
            self.dirty[pfns] = True

    def take(self) -> np.ndarray:
        pfns = np.flatnonzero(self.dirty)
        self.dirty[:] = False
        return pfns


class Workload:
    """The simulated guest's programs: every write goes through the dirty log, and every
    allocation through the buddy model (so that the driver's next scan sees it)."""

    def __init__(self, model: BuddyModel, mem: Memory, log: DirtyLog, seed: int,
                 driver: np.ndarray) -> None:
        self.model, self.mem, self.log = model, mem, log
        self.rng = np.random.default_rng(seed)
        self.generation = 0
        self.ram_mask = np.zeros(model.max_pfn, dtype=bool)
        for a, b in model.ram:
            self.ram_mask[a:b] = True
        self.driver = driver              # the balloon driver's pages: its rings, not ours

    def used(self) -> np.ndarray:
        """Pfns the guest uses now: RAM that is not free in its allocator."""
        return np.flatnonzero(self.ram_mask & ~self.model.free_mask())

    def data(self) -> np.ndarray:
        """Used pages that hold the programs' data (all but the driver's)."""
        return np.setdiff1d(self.used(), self.driver, assume_unique=True)

    def write(self, pfns: np.ndarray) -> None:
        """Fill whole pages with bytes no earlier write produced."""
        self.generation += 1
        for i in range(0, len(pfns), BATCH):
            part = pfns[i:i + BATCH]
            words = (part.astype(np.uint64) << np.uint64(20)) | np.uint64(self.generation)
            self.mem.pages.view(np.uint64)[self.mem.index(part)] = words[:, None]
        self.log.mark(pfns)

    def allocate(self, n: int, among: np.ndarray | None = None) -> np.ndarray:
        """Take ``n`` free pages (from ``among`` if given), write them; returns them."""
        free = self.model.free_mask()
        pool = np.flatnonzero(free) if among is None else among[free[among]]
        pfns = np.sort(self.rng.choice(pool, size=min(n, len(pool)), replace=False))
        free[pfns] = False
        self.model = BuddyModel.from_free_mask(
            free, self.model.ram, [(z.name, z.start_pfn, z.end_pfn) for z in self.model.zones])
        self.write(pfns)
        return pfns

    def touch(self, n: int) -> np.ndarray:
        """Rewrite ``n`` pages the guest already uses."""
        pfns = np.sort(self.rng.choice(self.data(), size=n, replace=False))
        self.write(pfns)
        return pfns


def free_mask(ranges: np.ndarray, max_pfn: int) -> np.ndarray:
    """A bool per pfn from (start_pfn, npages) ranges."""
    edges = np.zeros(max_pfn + 1, dtype=np.int32)
    np.add.at(edges, ranges[:, 0], 1)
    np.add.at(edges, ranges[:, 0] + ranges[:, 1], -1)
    return np.cumsum(edges[:-1]) > 0


def copy(src: Memory, dst: Memory, pfns: np.ndarray) -> int:
    """Send pages (here: a copy between memfds); returns the bytes sent."""
    for i in range(0, len(pfns), BATCH):
        idx = src.index(pfns[i:i + BATCH])
        dst.pages[idx] = src.pages[idx]
    return len(pfns) * PAGE


def differing(src: Memory, dst: Memory, pfns: np.ndarray) -> np.ndarray:
    """The pfns whose bytes differ between source and destination."""
    bad = []
    for i in range(0, len(pfns), BATCH):
        part = pfns[i:i + BATCH]
        idx = src.index(part)
        bad.append(part[(src.pages[idx] != dst.pages[idx]).any(axis=1)])
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


async def migrate(memory: int, seed: int, workdir: str) -> dict[str, int]:
    model = BuddyModel.after_workload(memory, seed=seed)
    layout = ", ".join(f"[{size(g)}, {size(g + s)})" for g, s in model.layout)
    print(f"pre-copy migration of a {size(memory)} guest (RAM {layout}), right after a "
          "memory-hungry workload exited")
    daemon = Daemon(os.path.join(workdir, "vb.sock"), stats_interval=0,
                    control_path=os.path.join(workdir, "control.sock"), export_dir=workdir)
    await daemon.start()
    source, destination = GuestRam(model.layout, name="source"), \
        GuestRam(model.layout, name="destination")
    src, dst = Memory(source), Memory(destination)
    fe = await Frontend.connect(daemon.socket_path)
    guest = None
    try:
        await fe.init(daemon.device.max_queues())
        guest = BalloonGuest(fe, source, driver_at=DRIVER_AT, driver_bytes=DRIVER_BYTES)
        await guest.probe()
        log = DirtyLog(model.max_pfn)
        driver = np.arange(DRIVER_AT // PAGE, (DRIVER_AT + DRIVER_BYTES) // PAGE)
        work = Workload(model, src, log, seed, driver)
        work.write(work.data())                       # the guest's data, before migration

        async with AsyncClient(daemon.control_path) as vb:
            # 1. dirty tracking first, then 2. the round
            log.start()
            r = await vb.start_round("bitmap")
            print(f"1. dirty tracking on; 2. start-free-page-round over {daemon.control_path}: "
                  f"round {r.id} {r.state}")
            before = work.allocate(2000), work.touch(3000)
            print(f"   the guest runs on: allocates {len(before[0]):,} free pages and rewrites "
                  f"{len(before[1]):,} used ones before its driver scans")
            await guest.answer_bitmap_request(work.model)
            log.mark(driver)                          # the driver wrote its queues
            r = await vb.wait_round(r.id, timeout=30)
            e = await vb.export(f"round-{r.id}.ranges", "ranges", r.id)
            m = read_export(e.path)
            print(f"   round {r.id}: {r.state}, coverage {100 * r.coverage:.1f} %, free "
                  f"{size(r.free_bytes)} in {len(m.ranges):,} ranges (export-free-page-map -> "
                  f"{os.path.basename(e.path)}, {e.bytes:,} bytes)")
            skip = free_mask(m.ranges, model.max_pfn)
            after = work.allocate(1000, among=np.flatnonzero(skip)), work.touch(500)
            print(f"   the guest runs on: allocates {len(after[0]):,} pages the map reported "
                  f"free, rewrites {len(after[1]):,} used ones")

        # 3. first pass: every RAM page but the free ones
        ram = np.flatnonzero(work.ram_mask)
        first = copy(src, dst, ram[~skip[ram]])
        during = work.touch(400)
        print(f"3. first pass: {size(first)} sent ({len(ram) - int(skip[ram].sum()):,} pages; "
              f"{int(skip[ram].sum()):,} free pages skipped); meanwhile the guest rewrote "
              f"{len(during):,} pages")

        # 4. stop and copy: the guest is paused; resend what the dirty log caught
        used = work.used()
        stale = differing(src, dst, used)
        dirty = log.take()
        resent = copy(src, dst, dirty)
        lost = np.intersect1d(after[0], stale)
        print(f"4. stop and copy: {len(dirty):,} dirty pages resent, {size(resent)}; without "
              f"them {len(stale):,} used pages would be stale, {len(lost):,} of them pages the "
              "map had reported free")

        # 5. the destination holds every page the guest uses
        wrong = differing(src, dst, used)
        assert len(wrong) == 0, f"{len(wrong)} used pages differ after migration"
        assert np.isin(stale, dirty).all(), "a stale page escaped the dirty log"
        print(f"5. check: all {len(used):,} pages the guest uses are identical, byte for byte")

        with_map = first + resent
        without = len(ram) * PAGE + resent
        print(f"bytes sent: {size(with_map)} with the map, {size(without)} without it "
              f"({without / with_map:.1f}x less)")
        return {"with_map": with_map, "without_map": without, "resent": resent,
                "used_pages": len(used), "stale": len(stale), "lost_without_log": len(lost)}
    finally:
        await fe.close()
        if guest is not None:
            guest.close()
        await daemon.close()
        src.release()
        dst.release()
        source.close()
        destination.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", default="2G", help="guest RAM (default 2G; at least 128M)")
    p.add_argument("--seed", type=int, default=3, help="seed of the guest's memory layout")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vballoon-precopy-") as workdir:
        asyncio.run(migrate(parse_size(args.memory), args.seed, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
