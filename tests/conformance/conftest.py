"""The daemon with a control socket, and a loopback guest, for the conformance tests."""
from __future__ import annotations

import pytest

from vballoon.daemon import Daemon
from vballoon.loopback import Frontend, GuestRam
from vballoon.loopback.guest import BalloonGuest
from vballoon.scanner import BuddyModel

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
async def daemon(tmp_path):
    exports = tmp_path / "exports"
    exports.mkdir()
    d = Daemon(str(tmp_path / "vb.sock"), stats_interval=0,
               control_path=str(tmp_path / "control.sock"), export_dir=str(exports))
    await d.start()
    yield d
    await d.close()


@pytest.fixture
async def guest(daemon):
    """A 2 GiB guest with the reference driver, attached over the loopback front-end."""
    model = BuddyModel.after_workload(2 * GiB, seed=4)
    ram = GuestRam(model.layout)
    fe = await Frontend.connect(daemon.socket_path)
    await fe.init(daemon.device.max_queues())
    g = BalloonGuest(fe, ram, driver_at=16 * MiB, driver_bytes=4 * MiB, queue_size=64)
    await g.probe()
    yield g, model
    await fe.close()
    g.close()
    ram.close()
