"""A second device, virtio-rng, served by the same vhost-user stack as the balloon: the session,
transport and virtqueue layers know nothing of either device."""
from __future__ import annotations

import asyncio
import os

import pytest

from vballoon.devices.rng import MAX_REQUEST, Rng
from vballoon.sim import DriverQueue, GuestRam
from vballoon.testing.mock import MockDevice
from vballoon.testing.rigs import served
from vballoon.wire import C

ACKED = 1 << C.VIRTIO_F_VERSION_1 | 1 << C.VIRTIO_RING_F_EVENT_IDX


async def readable(fd: int, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_reader(fd)


@pytest.fixture
def ram():
    r = GuestRam([(0, 16 << 20)])
    yield r
    r.close()


async def test_rng_fills_each_buffer_with_fresh_random_bytes(tmp_path, ram, no_fd_leak):
    rng = Rng()
    async with served(rng, str(tmp_path / "rng.sock")) as fe:
        assert fe.features & ACKED == ACKED
        q = DriverQueue(ram, 0, 16, event_idx=True)
        try:
            await fe.start(ram, ACKED, [q])
            bufs = [ram.alloc(4096) for _ in range(4)]
            heads = [q.add([(b, 4096, True)]) for b in bufs]
            q.kick()
            used = await q.wait_used(4)
            assert sorted(u.head for u in used) == sorted(heads)
            assert all(u.len == 4096 for u in used)
            data = [bytes(ram.at(b, 4096)) for b in bufs]
            assert len(set(data)) == 4 and b"\0" * 4096 not in data
            assert rng.bytes_served == 4 * 4096
            # a buffer larger than MAX_REQUEST gets MAX_REQUEST bytes
            big = ram.alloc(MAX_REQUEST + 4096)
            q.add([(big, MAX_REQUEST + 4096, True)])
            q.kick()
            (u,) = await q.wait_used(1)
            assert u.len == MAX_REQUEST
        finally:
            q.close()


async def test_rng_readable_buffer_breaks_only_its_queue(tmp_path, ram, no_fd_leak):
    async with served(Rng(), str(tmp_path / "rng.sock")) as fe:
        q = DriverQueue(ram, 0, 16)
        try:
            await fe.start(ram, ACKED, [q])
            q.add([(ram.alloc(64), 64, False)])
            q.kick()
            await readable(fe.err_fds[0])          # the err eventfd says the queue broke
            assert os.eventfd_read(fe.err_fds[0]) == 1
        finally:
            q.close()


async def test_mock_device_sees_virtio_only(tmp_path, ram, no_fd_leak):
    dev = MockDevice(queues=2, config=b"\x01\x02\x03\x04")
    async with served(dev, str(tmp_path / "mock.sock")) as fe:
        queues = [DriverQueue(ram, i, 8) for i in range(2)]
        try:
            await fe.start(ram, ACKED, queues)
            assert await fe.get_config(4) == b"\x01\x02\x03\x04"
            await fe.set_config(b"\xff", offset=2)
            queues[1].add([(ram.alloc(16), 16, True)])
            queues[1].kick()
            await queues[1].wait_used(1)
            assert ("set_config", 2, b"\xff", False) in dev.calls
            assert ("queue_started", 1) in dev.calls and len(dev.chains[1]) == 1
            assert dev.acked_features == ACKED
        finally:
            for q in queues:
                q.close()
