"""The vhost-user back-end over a real Unix socket, with memfd RAM and eventfds, driven by the
loopback front-end through the sequences QEMU 11.1 sends."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import pytest

from vbtest import open_fds, until
from vballoon.devices.balloon.device import Balloon
from vballoon.errors import ConfigError
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.sockets import listen_unix
from vballoon.vhost.transport import Server
from vballoon.wire import C, HEADER, VRING_STATE

V1 = C.VHOST_USER_VERSION



@pytest.fixture
async def attached(server, sock_path, ram):
    """A front-end through realize and a guest driver through DRIVER_OK."""
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    guest = BalloonGuest(fe, ram)
    await guest.probe()
    yield fe, guest
    await fe.close()
    guest.close()


async def test_qemu_sequence_start_stop_start_close(server, sock_path, ram):
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    assert fe.queue_num == 6 and fe.protocol_features == 0x229
    guest = BalloonGuest(fe, ram)
    await guest.probe()
    await guest.inflate(300)                    # the rings work
    bases = await fe.stop()                     # guest reset: disable + GET_VRING_BASE
    assert bases[0] == 2                        # two inflate buffers (256 + 44 pfns)
    assert bases[2] == 0                        # the held stats buffer is rewound
    assert not any(q.running for q in server.queue_status())
    await guest.probe()                         # a second driver init, same rings
    await guest.deflate(300)
    assert guest.actual == 0
    await fe.close()
    guest.close()
    await until(lambda: server.connection is None)


async def test_kick_fd_already_signalled_at_set_vring_kick_is_harmless(server, sock_path, ram):
    # QEMU creates host notifiers already signalled: the first kick arrives on empty rings.
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    guest = BalloonGuest(fe, ram)
    for q in guest.queues.values():
        q.kick()
    await guest.probe()
    for q in guest.queues.values():
        q.kick()
    await guest.inflate(1)
    assert not any(q.broken for q in server.queue_status())
    await fe.close()
    guest.close()


async def test_daemon_serves_the_next_front_end_after_each_exit(server, sock_path, ram):
    for _ in range(3):
        fe = await Frontend.connect(sock_path)
        await fe.init(6)
        guest = BalloonGuest(fe, ram)
        await guest.probe()
        await guest.inflate(10)
        await fe.close()
        guest.close()
        await until(lambda: server.connection is None)
    assert server.connections_served == 3


async def test_no_fd_leaks_over_200_connect_disconnect_cycles(sock_path):
    ram = GuestRam(8 << 20)
    srv = Server(sock_path, Balloon())
    srv.start()

    async def cycle(full):
        fe = await Frontend.connect(sock_path)
        await fe.init(6)
        guest = None
        if full:
            guest = BalloonGuest(fe, ram, driver_bytes=1 << 20)
            await guest.probe()
        await fe.close()
        if guest:
            guest.close()
        await until(lambda: srv.connection is None)

    await cycle(True)                  # warm up lazily created objects
    before = open_fds()
    for i in range(200):
        await cycle(i % 10 == 0)       # every 10th cycle maps memory and sets up rings
    after = open_fds()
    await srv.close()
    ram.close()
    assert after - before == set()


async def test_second_front_end_is_refused_while_one_is_served(server, sock_path, caplog):
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(other, sock_path)
    assert await asyncio.wait_for(loop.sock_recv(other, 1), 5) == b""   # closed by the daemon
    other.close()
    assert "second front-end" in caplog.text
    await fe.write(C.VHOST_USER_SET_OWNER)      # the first one is unaffected
    await fe.close()


async def test_disconnect_in_the_middle_of_a_message(server, sock_path):
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    fe.sock.send(HEADER.pack(C.VHOST_USER_SET_FEATURES, V1, 8) + b"\0\0")   # 2 of 8 bytes
    await fe.close()
    await until(lambda: server.connection is None)
    fe2 = await Frontend.connect(sock_path)
    await fe2.init(6)
    await fe2.close()


@pytest.mark.parametrize("flags,size", [(0x2, 0), (0x5, 0), (V1, 8192)])
async def test_framing_error_closes_the_connection_and_the_daemon_goes_on(
        server, sock_path, flags, size, caplog):
    fe = await Frontend.connect(sock_path)
    await fe.send(C.VHOST_USER_GET_FEATURES, b"", flags=flags) if size == 0 else \
        fe.sock.send(HEADER.pack(C.VHOST_USER_SET_MEM_TABLE, flags, size))
    await until(lambda: server.connections_served == 1 and server.connection is None)
    assert "closing the connection" in caplog.text
    await fe.close()
    fe2 = await Frontend.connect(sock_path)
    await fe2.init(6)
    await fe2.close()


async def test_too_many_fds_are_refused_and_closed(server, sock_path, caplog):
    fe = await Frontend.connect(sock_path)
    fds = [os.eventfd(0) for _ in range(C.VHOST_USER_MAX_FDS + 2)]
    before = open_fds()
    await fe.send(C.VHOST_USER_SET_OWNER, b"", fds)
    for fd in fds:
        os.close(fd)
    await until(lambda: server.connections_served == 1 and server.connection is None)
    assert "fd-truncated" in caplog.text
    await fe.close()
    assert open_fds() <= before


async def test_config_change_is_announced_only_once_the_driver_runs(server, sock_path, ram):
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    server.device.set_target(16)                 # before DRIVER_OK: not announced
    guest = BalloonGuest(fe, ram)
    await guest.probe()
    assert fe.config_changes == 0
    server.device.set_target(32)
    await fe.wait_config_change()
    assert fe.config_changes == 1
    assert (await guest.config())[0] == 32
    await fe.close()
    guest.close()


async def test_mem_table_again_while_rings_run(server, attached, ram):
    fe, guest = attached
    await guest.inflate(10)
    await fe.set_mem_table(ram)                  # e.g. after memory hotplug
    await guest.inflate(10)
    assert server.device.counters.inflated_pages == 20


async def test_broken_queue_signals_err_and_the_others_keep_working(server, attached):
    fe, guest = attached
    q = guest.queues["deflate"]
    q.write_desc(0, 0, 16, C.VRING_DESC_F_NEXT, 0)    # a chain that loops on itself
    q.publish(0)
    q.kick()
    await until(lambda: server.queue_status()[1].broken)
    assert os.eventfd_read(fe.err_fds[1]) == 1
    await guest.inflate(5)                            # queue 0 is fine
    assert server.device.counters.inflated_pages == 5


async def test_get_vring_base_stops_the_ring(attached):
    fe, guest = attached
    reply = await fe.call(C.VHOST_USER_GET_VRING_BASE, VRING_STATE.pack(0, 0))
    assert VRING_STATE.unpack(reply) == (0, 0)
    q = guest.queues["inflate"]
    q.add([(guest._pfn_buf, 4, False)])
    q.kick()
    with pytest.raises(TimeoutError):
        await q.wait_used(1, timeout=0.2)             # stopped: nothing is processed


async def test_reply_ack_acknowledges_each_request(server, sock_path):
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    await fe.write(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 64))
    with pytest.raises(Exception, match="failed"):
        await fe.write(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(9, 64))
    await fe.close()


# -- the socket path --------------------------------------------------------------------------

async def test_path_served_by_another_process_is_refused(server, sock_path):
    with pytest.raises(ConfigError, match="socket-path-in-use"):
        listen_unix(sock_path)


def test_path_that_is_not_a_socket_is_refused(tmp_path):
    p = tmp_path / "file"
    p.write_text("x")
    with pytest.raises(ConfigError, match="socket-path-not-socket"):
        listen_unix(str(p))


def test_stale_socket_is_replaced(tmp_path):
    p = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(p)
    s.close()                                     # a socket file nobody listens on
    sock = listen_unix(p)
    sock.close()
    os.unlink(p)


def _serve(path, *extra):
    return subprocess.Popen([sys.executable, "-m", "vballoon", "--log-level", "warning",
                             "serve", "--socket-path", path, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_reports_ready_and_stops_cleanly_on_sigterm(sock_path):
    p = _serve(sock_path)
    try:
        assert p.stdout.readline().strip() == f"vballoon: ready on {sock_path}"
        assert os.path.exists(sock_path)
        second = _serve(sock_path)
        _, err = second.communicate(timeout=30)
        assert second.returncode == 2 and "already served" in err
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert not os.path.exists(sock_path)
    finally:
        p.kill()
        p.communicate()


def test_serve_rejects_an_unknown_feature(sock_path):
    p = _serve(sock_path, "--feature", "warp-drive=on")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "bad-feature" in err
    assert not os.path.exists(sock_path)


async def test_a_rebooted_guest_is_a_new_driver_and_a_resumed_one_is_not(server, sock_path):
    ram = GuestRam(64 << 20)
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    guest = BalloonGuest(fe, ram)
    await guest.probe()
    await guest.inflate(300)
    device = server.device
    await fe.stop()                          # VM paused: rings stopped, indices kept
    await guest.probe()                      # resumed at the same indices
    assert device.counters.inflated_pages == 300 and device.actual == 300
    await fe.stop()                          # guest reboot: QEMU resets the indices to 0
    fe.bases.clear()
    guest.close()
    rebooted = BalloonGuest(fe, ram)
    await rebooted.probe()
    assert device.counters.inflated_pages == 0 and device.actual == 0
    assert not device.inflated.any()
    await rebooted.inflate(300)              # the same pfns: discarded again
    assert device.counters.inflated_pages == 300
    await fe.close()
    rebooted.close()
    ram.close()
