"""``vballoon demo``: the daemon, the loopback front-end and a simulated guest, one free-page round.

Nothing here is mocked below the guest: the daemon serves a real Unix socket, the front-end
speaks vhost-user to it as QEMU does, guest RAM is a (sparse) memfd shared through SCM_RIGHTS,
kicks and interrupts are eventfds.  The guest is the reference driver of ``vballoon.sim``
with a model of a Linux buddy allocator "after a memory-hungry workload exited" (the seed
series' headline case), answering the round with the reference scanner.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from vballoon.app.daemon import Daemon
from vballoon.app.service import BalloonService
from vballoon.devices.balloon import Balloon
from vballoon.fpmap.export import read_export, write_export
from vballoon.fpmap.picture import render_png
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.sim.scanner import BuddyModel, driver_chunks
from vballoon.units import FRAME, MiB, format_size


def seed_errors(model: BuddyModel) -> tuple[int, int]:
    """What the seed's v3 scanner gets wrong on ``model``: (used pages it reports free, free
    pages it misses).  The first kind corrupts a migration; the second only costs bytes."""
    free = model.free_bitmap()
    wrong = missed = 0
    for chunk in driver_chunks(model, 1, scan=model.seed_get_unused_pages):
        bits = np.frombuffer(b"".join(chunk.bitmaps), dtype=np.uint64)
        lo = chunk.start_pfn // 64
        mine = free[lo:lo + bits.size]
        bits = bits[:mine.size]
        wrong += int(np.unpackbits((bits & ~mine).view(np.uint8)).sum())
        missed += int(np.unpackbits((mine & ~bits).view(np.uint8)).sum())
    return wrong, missed


async def run_demo(mem_bytes: int = 8 << 30, *, seed: int = 2, out: str = "vballoon-demo") -> int:
    """The demo on a guest of ``mem_bytes`` (from 128 MiB), writing its files into ``out``."""
    model = BuddyModel.after_workload(mem_bytes, seed=seed)
    layout = ", ".join(f"[{format_size(g)}, {format_size(g + s)})" for g, s in model.layout)
    print(f"vballoon demo: a {format_size(mem_bytes)} guest (RAM {layout}) right after a "
          "memory-hungry workload exited")
    with tempfile.TemporaryDirectory(prefix="vballoon-demo-") as tmp:
        device = Balloon(stats_interval=0)
        daemon = Daemon(os.path.join(tmp, "vb.sock"), device)
        service = daemon.service
        assert service is not None          # the balloon's service comes with the balloon
        await daemon.start()
        ram = GuestRam(model.layout)
        fe = await Frontend.connect(daemon.socket_path)
        try:
            await fe.init(device.max_queues())
            guest = BalloonGuest(fe, ram, driver_at=16 * MiB, driver_bytes=4 * MiB)
            await guest.probe()
            print(f"daemon on {daemon.socket_path}; loopback front-end attached (vhost-user, "
                  f"memfd guest RAM, eventfds); the guest acked features "
                  f"{guest.acked:#x}: queues {', '.join(device.queue_names)}")
            await _inflate(device, service, guest, ram)
            await _round(device, service, guest, model, out)
        finally:
            await fe.close()
            guest.close()
            await daemon.close()
            ram.close()
    return 0


async def _inflate(device: Balloon, service: BalloonService, guest: BalloonGuest,
                   ram: GuestRam) -> None:
    """Balloon 64 MiB of pages the guest had used, and show the memfd giving them back."""
    pages = (64 * MiB) // FRAME
    for pfn in guest.pool[:pages]:
        ram.at(pfn * FRAME, 8)[:] = b"usedpage"          # the guest's data: backed pages
    before = ram.allocated_bytes
    service.balloon(service.ram_bytes() - 64 * MiB)
    await guest.fe.wait_config_change()
    await guest.balance()
    c = device.counters
    print(f"balloon: target {format_size(service.logical_size())} reached; guest RAM backing fell by "
          f"{format_size(before - ram.allocated_bytes)} in {c.discard_calls} discard calls "
          f"(one per contiguous range)")


async def _round(device: Balloon, service: BalloonService, guest: BalloonGuest,
                 model: BuddyModel, out: str) -> None:
    t0 = time.perf_counter()
    r = device.start_round("bitmap")
    chunks = await guest.answer_bitmap_request(model)
    info = (await service.wait_round(r.id, timeout=10)).to_qmp()
    elapsed = time.perf_counter() - t0
    ranges = r.map.ranges()
    ram = info["ram-pages"] * FRAME
    free = info["free-bytes"]
    print(f"free-page round {r.id} ({info['kind']} queue): {info['state']}, {chunks} chunk(s), "
          f"{elapsed * 1000:.1f} ms from request to DONE")
    print(f"  free: {format_size(free)} of {format_size(ram)} ({100 * free / ram:.1f}%) in "
          f"{ranges.shape[0]:,} ranges; coverage {100 * info['coverage']:.1f}%")
    print(f"  a migration that tracks dirty pages from before the request can skip "
          f"{format_size(free)}: it sends {format_size(ram - free)} instead of {format_size(ram)}")
    os.makedirs(out, exist_ok=True)
    res = write_export(r, out, f"round-{r.id}.vbmap", "ranges")
    back = read_export(res.path)
    assert back.ranges.shape == ranges.shape, "the export does not read back"
    png = os.path.abspath(os.path.join(out, f"round-{r.id}.png"))
    render_png(r.map, device.ballooned_bitmap(r.map.max_pfn), png, width=1024,
               title=f"round {r.id}: {format_size(free)} free of {format_size(ram)}")
    print(f"  map written: {res.path} ({res.bytes:,} bytes, {res.ranges:,} ranges; "
          f"protocol/export-format.md), picture {png}")
    wrong, missed = seed_errors(model)
    print(f"  the seed's 2016 scanner, on the same guest: {wrong:,} used page(s) reported free, "
          f"{missed:,} free page(s) missed (its bitmap-boundary bug); the reference scanner: "
          "none of either")
