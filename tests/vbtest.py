"""Helpers shared by the test files (``from vbtest import ...``; a unique module name, so that
no other directory's conftest.py can shadow it)."""
from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from vballoon.app.daemon import Daemon
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.sim.scanner import BuddyModel

MiB, GiB = 1 << 20, 1 << 30


async def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait for ``cond()`` by yielding to the loop; no sleeps for synchronisation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fd_table() -> set[tuple[str, str]]:
    """(fd, what it points at) for every open fd; the fd listing /proc/self/fd drops out."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            pass
    return out


@asynccontextmanager
async def attached_guest(daemon: Daemon, mem_bytes: int,
                         seed: int) -> AsyncIterator[tuple[BalloonGuest, BuddyModel]]:
    """A guest of ``mem_bytes`` (a buddy model after a workload; q35 layout) with the reference
    driver, attached to ``daemon`` over the loopback front-end."""
    model = BuddyModel.after_workload(mem_bytes, seed=seed)
    ram = GuestRam(model.layout)
    fe = await Frontend.connect(daemon.socket_path)
    await fe.init(daemon.device.max_queues())
    g = BalloonGuest(fe, ram, driver_at=16 * MiB, driver_bytes=4 * MiB, queue_size=64)
    try:
        await g.probe()
        yield g, model
    finally:
        await fe.close()
        g.close()
        ram.close()
