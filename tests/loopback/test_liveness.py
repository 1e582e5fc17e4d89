"""Issue 10 item 1 end to end: a guest that fills a large inflate ring with buffers (here the
same chain, re-published 32,768 times) cannot starve the daemon: the queue is worked in bounded
slices, and a control command sent right after the kick is answered while the backlog is still
being worked, not after it.  The repeated guest error is logged a bounded number of times."""
from __future__ import annotations

import logging

from vbtest import GiB, MiB

from vballoon.control.client import AsyncClient
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.sim.scanner import BuddyModel
from vballoon.wire import LE32

RING = 32768          # the largest split ring (VIRTIO 1.2 §2.7)


async def test_item1_a_full_ring_does_not_starve_the_control_socket(daemon, caplog):
    caplog.set_level(logging.WARNING)
    model = BuddyModel.after_workload(1 * GiB, seed=3)
    ram = GuestRam(model.layout)
    fe = await Frontend.connect(daemon.socket_path)
    try:
        await fe.init(daemon.device.max_queues())
        g = BalloonGuest(fe, ram, driver_at=16 * MiB, driver_bytes=16 * MiB, queue_size=RING)
        await g.probe()
        q = g.queues["inflate"]
        buf = ram.alloc(4 * 256, 4)
        ram.at(buf, 4 * 256)[:] = LE32.pack(0xFFFFFFF0) * 256        # PFNs outside RAM
        head = q.add([(buf, 4 * 256, False)])
        for _ in range(RING - 1):
            q.publish(head)
        async with AsyncClient(daemon.control_path) as client:
            q.kick()
            await client.query_balloon()
            used_at_reply = q.used_idx()
            await q.wait_used(RING, timeout=120)
        assert 0 < used_at_reply < RING, (
            f"the reply came after {used_at_reply} of {RING} buffers: the queue was worked "
            "in one go, holding up the control socket")
        flood_lines = [r for r in caplog.records if "outside" in r.getMessage()]
        assert len(flood_lines) < 50, f"{len(flood_lines)} log lines for one repeated mistake"
        g.close()
    finally:
        await fe.close()
        ram.close()
