"""Rigs shared by the tests of any device: guest RAM as the daemon maps it, a driver queue and
the device's VirtQueue on the same rings, and a device served on a real Unix socket."""
from __future__ import annotations

import os
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator, Sequence

from vballoon.sim import DriverQueue, Frontend, GuestRam
from vballoon.vhost.fds import signal_eventfd
from vballoon.vhost.session import (PROTOCOL_FEATURES, Close, CloseFds, Message, Session,
                                    SetBackendChannel, Signal)
from vballoon.virtio.device import Device
from vballoon.virtio.memory import GuestMemory, RegionSpec
from vballoon.virtio.virtqueue import VirtQueue
from vballoon.wire import C, HEADER, U64


def mapped(ram: GuestRam) -> GuestMemory:
    """The daemon's view of ``ram``, as SET_MEM_TABLE would build it."""
    return GuestMemory.map([RegionSpec(*r) for r in ram.regions],
                           [os.dup(ram.fd) for _ in ram.regions])


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


class SessionRig:
    """A vhost-user session around ``device`` (default: a :class:`MockDevice` of 6 queues and
    16 bytes of config), with the actions carried out as the transport would: CloseFds closes
    (an fd closed twice raises), a backend channel is kept until :meth:`close`, Signal writes
    the eventfd.  Messages go in with :meth:`send` / :meth:`ack`; ``actions`` records the rest."""

    def __init__(self, device: Device | None = None) -> None:
        from vballoon.testing.mock import MockDevice
        self.actions: list[object] = []
        self.device = device if device is not None else MockDevice(6, config=bytes(16))
        self.owned: list[int] = []
        self.s = Session(self.device, self.apply)

    def apply(self, action: object) -> None:
        self.actions.append(action)
        if isinstance(action, CloseFds):
            for fd in action.fds:
                os.close(fd)
        elif isinstance(action, SetBackendChannel):
            self.owned.append(action.fd)
        elif isinstance(action, Signal):
            signal_eventfd(action.fd)

    def kinds(self) -> list[type]:
        return [type(a) for a in self.actions]

    def closed(self) -> bool:
        return any(isinstance(a, Close) for a in self.actions)

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             flags: int = C.VHOST_USER_VERSION) -> bytes | None:
        return self.s.handle(Message(request, flags, payload, list(fds)))

    def reply_payload(self, reply: bytes, request: int) -> bytes:
        req, flags, size = HEADER.unpack_from(reply)
        assert (req, flags, size) == (request, 0x5, len(reply) - HEADER.size)
        return reply[HEADER.size:]

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY; the u64 the back-end acked with (0: success)."""
        reply = self.send(request, payload, fds,
                          flags=C.VHOST_USER_VERSION | C.VHOST_USER_NEED_REPLY_MASK)
        assert reply is not None
        return U64.unpack(self.reply_payload(reply, request))[0]

    def negotiate(self) -> None:
        self.send(C.VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(PROTOCOL_FEATURES))

    def close(self) -> None:
        self.s.close()
        for fd in self.owned:
            os.close(fd)
        self.owned.clear()
