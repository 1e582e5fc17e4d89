"""Rigs shared by the tests of any device: guest RAM as the daemon maps it, a driver queue and
the device's VirtQueue on the same rings, and a device served on a real Unix socket."""
from __future__ import annotations

import os
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator

from vballoon.sim import DriverQueue, Frontend, GuestRam
from vballoon.virtio.device import Device
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import VirtQueue


def mapped(ram: GuestRam) -> GuestMemory:
    """The daemon's view of ``ram``, as SET_MEM_TABLE would build it."""
    return GuestMemory.map(ram.regions, [os.dup(ram.fd) for _ in ram.regions])


@contextmanager
def queue_pair(ram: GuestRam, num: int = 8, *, index: int = 0, indirect: bool = True,
               event_idx: bool = False) -> Iterator[tuple[GuestMemory, DriverQueue, VirtQueue]]:
    """A driver-side queue in ``ram`` and the device's VirtQueue on the same rings, with no
    socket in between: for tests of a queue handler or of the ring itself."""
    mem = mapped(ram)
    dq = DriverQueue(ram, index, num, event_idx=event_idx, indirect=indirect)
    vq = VirtQueue(index)
    vq.num, vq.indirect, vq.event_idx = num, indirect, event_idx
    vq.desc_addr, vq.avail_addr, vq.used_addr = ram.uva(dq.desc), ram.uva(dq.avail), ram.uva(dq.used)
    vq.attach(mem)
    try:
        yield mem, dq, vq
    finally:
        vq.detach()
        dq.close()
        mem.close()


@asynccontextmanager
async def served(device: Device, path: str) -> AsyncIterator[Frontend]:
    """``device`` served on ``path`` by the daemon (any device: the daemon is generic), and a
    loopback front-end connected to it and initialised for every queue the device has."""
    from vballoon.app.daemon import Daemon
    daemon = Daemon(path, device)
    await daemon.start()
    fe = await Frontend.connect(path)
    try:
        await fe.init(device.max_queues())
        yield fe
    finally:
        await fe.close()
        await daemon.close()
