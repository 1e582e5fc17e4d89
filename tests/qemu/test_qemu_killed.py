"""Issue 10: a real QEMU killed (SIGKILL, no orderly stop) again and again, at different moments
of its session; the daemon serves the next QEMU every time, and ends with the fds it began with.
The kill moments: before the guest's driver ran, while the guest idles with its queues running,
and right after a balloon request, in turn."""
from __future__ import annotations

import asyncio

from harness import Guest, wait_until
from test_vballoon import socket_path, vhost_balloon_args
from vbtest import fd_table

from vballoon.app.daemon import Daemon

KILLS = 10
MiB = 1 << 20


async def served_and_released(daemon: Daemon, n: int) -> None:
    """Until the daemon has accepted QEMU number ``n`` and let it go."""
    await wait_until(lambda: daemon.server.connections_served >= n and not daemon.server.connected,
                     timeout=30, what=f"QEMU {n} served and released")


async def test_qemu_killed_ten_times_mid_session(lab, make_guest, tmp_path, qemu_report):
    sock = socket_path(tmp_path)
    daemon = Daemon(sock, stats_interval=0.5)
    await daemon.start()
    baseline = fd_table()
    try:
        for i in range(KILLS):
            args = vhost_balloon_args(sock, daemon.device.max_queues())
            if i % 3 == 0:                 # early: QEMU connected, the guest still booting
                (tmp_path / f"q{i}").mkdir()
                g = Guest(lab, args, workdir=tmp_path / f"q{i}")
                await g.start(wait_ready=False)
                await wait_until(lambda: daemon.server.connections_served > i, timeout=30,
                                 what="QEMU's connection")
                await g.kill()
                await g.close()
                await served_and_released(daemon, i + 1)
                continue
            g = await make_guest(args, workdir=tmp_path / f"q{i}")
            if i % 3 == 2:                 # mid-request: a balloon target just sent
                await wait_until(lambda: daemon.server.driver_attached, timeout=30,
                                 what="the guest's driver")
                daemon.service.balloon(daemon.service.ram_bytes() - 16 * MiB)
            await g.kill()
            await g.close()                # the harness's own logs (not the daemon's fds)
            await served_and_released(daemon, i + 1)
            assert daemon.server.connections_refused == 0
        # the next QEMU is served completely: its guest balloons to the target the killed
        # ones left (16 MiB; a target survives reconnects), then to a new one (32 MiB)
        g = await make_guest(vhost_balloon_args(sock, daemon.device.max_queues()),
                             workdir=tmp_path / "last")
        await wait_until(lambda: daemon.server.driver_attached, timeout=30,
                         what="the guest's driver")
        daemon.service.balloon(daemon.service.ram_bytes() - 32 * MiB)
        for _ in range(300):
            if (await g.vmstat())["balloon_inflate"] >= 8192:
                break
            await asyncio.sleep(0.1)
        assert (await g.vmstat())["balloon_inflate"] == 8192        # 32 MiB, 4 KiB pages
        await g.kill()
        await g.close()
        await served_and_released(daemon, KILLS + 1)
        assert fd_table() == baseline, "fds left after ten killed QEMUs"
        qemu_report.line(f"QEMU killed {KILLS} times mid-session: every next QEMU served, "
                         "fds back to where they began")
    finally:
        await daemon.close()
