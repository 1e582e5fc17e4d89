"""Shared fixtures: an in-process daemon on a real Unix socket, and fd accounting."""
from __future__ import annotations

import os

import pytest
from vbtest import open_fds

from vballoon.devices.balloon.device import Balloon
from vballoon.app.daemon import Daemon
from vballoon.sim import Frontend, GuestRam
from vballoon.vhost.transport import Server


@pytest.fixture
def no_fd_leak():
    """Fails the test if it leaves fds open (compare /proc/self/fd before and after)."""
    before = open_fds()
    yield
    leaked = {fd: _target(fd) for fd in open_fds() - before}
    leaked = {fd: t for fd, t in leaked.items() if t is not None}
    assert not leaked, f"fds leaked: {leaked}"


def _target(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None    # the fd listing /proc/self/fd itself


@pytest.fixture
async def daemon(tmp_path):
    """The daemon with a control socket and an export directory, no stats timer."""
    exports = tmp_path / "exports"
    exports.mkdir()
    d = Daemon(str(tmp_path / "vb.sock"), stats_interval=0,
               control_path=str(tmp_path / "control.sock"), export_dir=str(exports))
    await d.start()
    yield d
    await d.close()


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "vb.sock")


@pytest.fixture
async def server(sock_path):
    srv = Server(sock_path, Balloon())
    srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def frontend(server, sock_path):
    fe = await Frontend.connect(sock_path)
    yield fe
    await fe.close()


@pytest.fixture
def ram():
    r = GuestRam([(0, 64 << 20)])
    yield r
    r.close()


