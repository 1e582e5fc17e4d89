"""The device kit: the same daemon serves a second, tiny device (virtio-rng), and an idle
daemon sleeps (one timer at the device's earliest deadline, none when it needs no time)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from vballoon.app.daemon import Daemon, DaemonFailed
from vballoon.devices.rng import Rng
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.driver import DriverQueue
from vballoon.virtio.device import Device, TRANSPORT_FEATURES
from vballoon.wire import C


async def test_the_daemon_serves_a_second_device(tmp_path):
    daemon = Daemon(str(tmp_path / "rng.sock"), Rng())
    await daemon.start()
    ram = GuestRam(1 << 20)
    fe = await Frontend.connect(daemon.socket_path)
    q = DriverQueue(ram, 0, 16)
    try:
        await fe.init(daemon.device.max_queues())
        assert fe.features & TRANSPORT_FEATURES == TRANSPORT_FEATURES
        await fe.start(ram, 1 << C.VIRTIO_F_VERSION_1, [q])
        buf = ram.alloc(64)
        q.add([(buf, 64, True)])
        q.kick()
        used = await q.wait_used(1)
        assert used[0].len == 64 and bytes(ram.at(buf, 64)) != bytes(64)
        assert daemon.service is None
    finally:
        await fe.close()
        q.close()
        ram.close()
        await daemon.close()


class Ticking(Device):
    """A device that needs time every ``period`` seconds; its timer fails once."""

    def __init__(self, period: float) -> None:
        super().__init__()
        self.period, self.fired, self.failed = period, 0, False
        self.due = self.clock() + period

    def next_deadline(self):
        return self.due

    def handle_timer(self, now):
        if now < self.due:
            return
        self.fired += 1
        self.due = now + self.period
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug in the device's timer")


async def test_an_idle_daemon_makes_no_wakeups(tmp_path):
    daemon = Daemon(str(tmp_path / "vb.sock"), stats_interval=5,
                    control_path=str(tmp_path / "ctl.sock"))
    await daemon.start()
    try:
        await asyncio.sleep(0.3)
        assert daemon.wakeups == 0 and daemon.device.next_deadline() is None
    finally:
        await daemon.close()


async def test_item2_a_failing_timer_is_logged_and_armed_again(tmp_path, caplog):
    dev = Ticking(0.02)
    daemon = Daemon(str(tmp_path / "t.sock"), dev)
    await daemon.start()
    try:
        for _ in range(200):
            if dev.fired >= 3:
                break
            await asyncio.sleep(0.01)
        assert dev.fired >= 3                       # the timer lived on after the failure
        assert "the device's timer failed" in caplog.text
    finally:
        await daemon.close()


async def test_item2_a_failing_background_task_stops_the_daemon_loudly(tmp_path, caplog):
    daemon = Daemon(str(tmp_path / "t.sock"), Rng())
    await daemon.start()

    async def broken():
        raise RuntimeError("a bug in a background task")
    try:
        with caplog.at_level(logging.ERROR):
            daemon.supervise(broken(), "the broken task")
            with pytest.raises(DaemonFailed, match="a bug in a background task"):
                await asyncio.wait_for(daemon.wait(), 5)
        assert "the broken task failed" in caplog.text
    finally:
        await daemon.close()


async def test_the_daemons_one_timer_ends_an_idle_round_and_requests_stats(tmp_path):
    from vbtest import GiB, attached_guest
    from vballoon.fpmap import RoundState
    daemon = Daemon(str(tmp_path / "vb.sock"), stats_interval=0.05)
    await daemon.start()
    try:
        async with attached_guest(daemon, 1 * GiB, seed=1) as (g, model):
            await g.answer_stats_request()          # returned by the timer, answered
            await g.answer_stats_request()
            daemon.device.bitmap.idle_timeout = 0.05
            r = daemon.device.start_round("bitmap")  # through the device: still armed
            for _ in range(500):
                if not r.active:
                    break
                await asyncio.sleep(0.01)
            assert r.state is RoundState.ABORTED and r.abort_reason == "timeout"
            assert daemon.wakeups >= 3
    finally:
        await daemon.close()
