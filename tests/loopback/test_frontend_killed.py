"""Issue 10: a front-end killed at every message boundary of QEMU's start-up sequence.  After
each death the daemon must serve the next front-end completely (a guest that balloons), with
no fd, mapping or state left behind."""
from __future__ import annotations

import asyncio

from vbtest import MiB, fd_table

from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest


class Killed(Exception):
    pass


async def start_guest(daemon, ram, *, die_after: int | None = None) -> tuple[Frontend, BalloonGuest, int]:
    """QEMU's sequence (device realize, then the guest's DRIVER_OK); with ``die_after``, the
    front-end vanishes after that many messages.  Returns the front-end, the guest, and how
    many messages were sent."""
    fe = await Frontend.connect(daemon.socket_path)
    sent = 0
    send = fe.send

    async def counting_send(*args, **kw):
        nonlocal sent
        if die_after is not None and sent == die_after:
            raise Killed()
        sent += 1
        await send(*args, **kw)

    fe.send = counting_send          # type: ignore[method-assign]
    g = BalloonGuest(fe, ram, driver_at=1 * MiB, driver_bytes=2 * MiB)
    try:
        await fe.init(daemon.device.max_queues())
        await g.probe()
    except Killed:
        await fe.close()             # the socket closes mid-sequence, as a killed QEMU's does
        g.close()
        raise
    return fe, g, sent


async def test_front_end_killed_at_every_message_boundary(daemon):
    ram = GuestRam([(0, 64 * MiB)])
    try:
        served = daemon.server.connections_served
        fe, g, total = await start_guest(daemon, ram)        # how long the sequence is
        await fe.close()
        g.close()
        await asyncio.wait_for(_released(daemon, served + 1), 5)
        baseline = fd_table()
        for k in range(total):
            served = daemon.server.connections_served
            try:
                await start_guest(daemon, ram, die_after=k)
            except Killed:
                pass
            await asyncio.wait_for(_released(daemon, served + 1), 5)
            assert fd_table() == baseline, f"fds left after a death at message {k}"
        # the next front-end is served completely: the guest balloons 4 MiB
        fe, g, _ = await start_guest(daemon, ram)
        try:
            daemon.service.balloon(daemon.service.ram_bytes() - 4 * MiB)
            await fe.wait_config_change()
            await g.balance()
            assert daemon.service.logical_size() == daemon.service.ram_bytes() - 4 * MiB
        finally:
            await fe.close()
            g.close()
        assert total >= 20, f"the start-up sequence had only {total} messages"
    finally:
        ram.close()


async def _released(daemon, served: int) -> None:
    """Until the daemon has accepted connection number ``served`` and let it go."""
    while daemon.server.connections_served < served or daemon.server.connected:
        await asyncio.sleep(0.01)
