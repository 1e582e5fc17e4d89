"""Reliability of the vhost-user transport over a real Unix socket (issue 10), one named test per
item: reconnect race (#16), accept errors (#5), fds of failed messages (#7), non-socket backend
fd (#6), blocking eventfds (#8), kick fds that are not eventfds (#12), bad layouts answered (#15),
bounded work per wake-up and rate-limited guest-error logs (#1)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest

from vballoon.sim import DriverQueue, Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.vhost.transport import Server
from vballoon.virtio.device import Device
from vballoon.wire import C, HEADER, MEM_REGION, MEMORY, U64
from vbtest import fd_table as open_fds, until

V1 = C.VHOST_USER_VERSION
NEED = V1 | C.VHOST_USER_NEED_REPLY_MASK





async def raw_ack(sock, request, payload=b"", fds=()):
    """Send one request with NEED_REPLY on a raw socket; the u64 of its ack (None at EOF)."""
    import array
    loop = asyncio.get_running_loop()
    data = HEADER.pack(request, NEED, len(payload)) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)
    buf = b""
    while len(buf) < 20:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 20 - len(buf)), 5)
        if not chunk:
            return None
        buf += chunk
    req, flags, size = HEADER.unpack_from(buf)
    assert (req, flags, size) == (request, 0x5, 8)
    return U64.unpack_from(buf, 12)[0]


async def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, path)
    return s


async def negotiated(path):
    s = await connect(path)
    s.sendmsg([HEADER.pack(C.VHOST_USER_SET_PROTOCOL_FEATURES, V1, 8) + U64.pack(0x229)])
    return s


# -- #16 -------------------------------------------------------------------------------------

def test_item16_1000_back_to_back_reconnects_none_refused(sock_path, tmp_path):
    """A real daemon process (the race needs two processes): each front-end is answered, sends
    more requests and closes, and the next connects at once.  Before the fix 8 of 3000 were
    refused in 1 of 5 runs ("a second front-end connected while one is served")."""
    log = open(tmp_path / "daemon.log", "w+")     # not a pipe: nobody reads it meanwhile
    p = subprocess.Popen([sys.executable, "-m", "vballoon", "--log-level", "info", "serve",
                          "--socket-path", sock_path], stdout=subprocess.PIPE, stderr=log,
                         text=True)
    try:
        assert "ready" in p.stdout.readline()
        get = HEADER.pack(C.VHOST_USER_GET_FEATURES, V1, 0)
        more = HEADER.pack(C.VHOST_USER_SET_OWNER, V1, 0) * 3
        answered = []
        fds = []
        for i in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(sock_path)
            try:
                s.sendall(get)
                reply = s.recv(20)
                s.sendall(more)          # requests still unread when the next one connects
            except ConnectionResetError:
                reply = b""
            s.close()
            answered.append(len(reply) == 20)
            if i in (10, 999):
                fds.append(len(os.listdir(f"/proc/{p.pid}/fd")))
    finally:
        p.terminate()
        p.communicate(timeout=30)
        log.seek(0)
        err = log.read()
        log.close()
    assert answered.count(False) == 0 and "second front-end" not in err
    assert err.count("front-end connected (#") == 1000
    assert fds[1] <= fds[0] + 1      # flat (the last connection may still be open)


async def test_item16_new_front_end_waits_for_the_old_ones_end_of_file(server, sock_path):
    """Deterministic form of the race: the old front-end has closed, its end of file is not
    processed yet when the new one is accepted."""
    old = await negotiated(sock_path)
    assert await raw_ack(old, C.VHOST_USER_SET_OWNER) == 0
    first = server.connection
    old.sendall(HEADER.pack(C.VHOST_USER_SET_OWNER, V1, 0))
    old.close()                                   # no yield to the loop from here on
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    await server._serve(theirs)
    assert server.connection is not None and server.connection is not first
    assert server.connections_refused == 0
    ours.setblocking(False)
    ours.sendall(HEADER.pack(C.VHOST_USER_SET_PROTOCOL_FEATURES, V1, 8) + U64.pack(0x229))
    assert await raw_ack(ours, C.VHOST_USER_SET_OWNER) == 0
    ours.close()


async def test_item16_a_live_second_front_end_is_still_refused(server, sock_path, caplog):
    first = await negotiated(sock_path)
    assert await raw_ack(first, C.VHOST_USER_SET_OWNER) == 0
    second = await connect(sock_path)
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(second, 1), 5) == b""
    assert server.connections_refused == 1 and "second front-end" in caplog.text
    assert await raw_ack(first, C.VHOST_USER_SET_OWNER) == 0
    first.close()
    second.close()


# -- #5 --------------------------------------------------------------------------------------

@contextlib.contextmanager
def no_free_fds():
    """Every fd number below the soft limit taken: the next accept() fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd, _ in open_fds()) + 8, hard))
    try:
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_item5_accept_loop_survives_emfile(server, sock_path, caplog):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    with no_free_fds():
        await loop.sock_connect(s, sock_path)
        await until(lambda: server.accept_errors >= 1)
    assert "accept-failed" in caplog.text and not server._accept.done()
    s.sendmsg([HEADER.pack(C.VHOST_USER_SET_PROTOCOL_FEATURES, V1, 8) + U64.pack(0x229)])
    assert await raw_ack(s, C.VHOST_USER_SET_OWNER) == 0     # served once fds are free
    s.close()
    fe = await Frontend.connect(sock_path)                   # and so is the next one
    await until(lambda: server.connection is None or server.connections_served == 2)
    await fe.init(6)
    await fe.close()


# -- #7 --------------------------------------------------------------------------------------

async def test_item7_fds_of_failed_messages_do_not_leak(server, sock_path, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    s = await negotiated(sock_path)
    assert await raw_ack(s, C.VHOST_USER_SET_OWNER) == 0
    before = open_fds()
    for _ in range(20):
        fds = [os.open(path, os.O_RDONLY), os.eventfd(0), os.eventfd(0)]
        assert await raw_ack(s, C.VHOST_USER_SET_VRING_KICK, U64.pack(0), fds) != 0
        for fd in fds:
            os.close(fd)
    assert open_fds() == before                  # was 8 -> 48 fds
    assert server.connection is not None
    s.close()


# -- #6 --------------------------------------------------------------------------------------

async def test_item6_pipe_as_backend_fd_is_refused_without_leaking(server, sock_path, caplog):
    s = await negotiated(sock_path)
    assert await raw_ack(s, C.VHOST_USER_SET_OWNER) == 0
    before = open_fds()
    for _ in range(10):
        r, w = os.pipe()
        assert await raw_ack(s, C.VHOST_USER_SET_BACKEND_REQ_FD, fds=[w]) != 0
        os.close(r)
        os.close(w)
        server.device.set_target(16)              # a config change: nothing sent, no leak
    assert open_fds() == before
    assert "fd-not-socket" in caplog.text
    s.close()


# -- #8 --------------------------------------------------------------------------------------

@contextlib.contextmanager
def watchdog(seconds):
    """Turn a blocked event loop into a test failure (SIGALRM interrupts the blocked write)."""
    def fire(*_):
        raise TimeoutError("the event loop blocked")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


async def test_item8_full_blocking_call_eventfd_never_blocks_the_daemon(server, sock_path, ram):
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    guest = BalloonGuest(fe, ram)
    await guest.probe()
    q = guest.queues["inflate"]
    call = os.eventfd(0)                          # blocking
    os.write(call, (0xFFFFFFFFFFFFFFFE).to_bytes(8, "little"))     # counter full
    await fe.write(C.VHOST_USER_SET_VRING_CALL, U64.pack(q.index), [call])
    assert not os.get_blocking(call)
    with watchdog(10):
        q.add([(guest._pfn_buf, 4, False)])
        q.kick()
        await until(lambda: q.used_idx() == 1)
        await fe.call_u64(C.VHOST_USER_GET_FEATURES)           # the daemon still answers
    os.close(call)
    await fe.close()
    guest.close()


# -- #12 -------------------------------------------------------------------------------------

async def test_item12_pipe_at_eof_as_kick_fd_is_refused(server, sock_path, caplog):
    s = await negotiated(sock_path)
    r, w = os.pipe()
    os.close(w)
    assert await raw_ack(s, C.VHOST_USER_SET_VRING_KICK, U64.pack(0), [r]) != 0
    os.close(r)
    assert "fd-not-eventfd" in caplog.text
    assert await raw_ack(s, C.VHOST_USER_SET_OWNER) == 0       # no spin, still answering
    assert caplog.text.count("kick") < 5
    s.close()


# -- #15 -------------------------------------------------------------------------------------

def table(*regions):
    return MEMORY.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)


@pytest.mark.parametrize("layout", [
    (0x800, 1 << 19, 1 << 30, 0),                 # not page-aligned
    (0, 1 << 62, 1 << 30, 0),                     # past the end of the fd
    (0, 0, 1 << 30, 0),                           # empty
    (2**64 - 4096, 1 << 20, 0, 0),                # overflows
])
async def test_item15_bad_memory_layouts_get_an_error_reply(server, sock_path, caplog, layout):
    ram = GuestRam(1 << 20)
    s = await negotiated(sock_path)
    assert await raw_ack(s, C.VHOST_USER_SET_MEM_TABLE, table(layout), [ram.fd]) != 0
    assert server.connection is not None and "Traceback" not in caplog.text
    r = ram.regions[0]
    assert await raw_ack(s, C.VHOST_USER_SET_MEM_TABLE, table(
        (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)), [ram.fd]) == 0
    s.close()
    await until(lambda: server.connection is None)
    ram.close()


async def test_item15_regular_file_kick_fd_gets_an_error_reply(server, sock_path, tmp_path,
                                                                 caplog):
    (tmp_path / "k").write_bytes(bytes(8))
    fd = os.open(tmp_path / "k", os.O_RDONLY)
    s = await negotiated(sock_path)
    assert await raw_ack(s, C.VHOST_USER_SET_VRING_KICK, U64.pack(0), [fd]) != 0
    os.close(fd)
    assert server.connection is not None and "Traceback" not in caplog.text
    assert await raw_ack(s, C.VHOST_USER_SET_OWNER) == 0
    s.close()


# -- #1 --------------------------------------------------------------------------------------

class OnePerCall(Device):
    """Returns one chain per process() call and says whether more are there (the bound)."""

    device_id = 0x7E

    def __init__(self):
        super().__init__()
        self.calls = 0

    def features(self):
        return 1 << C.VIRTIO_F_VERSION_1

    def max_queues(self):
        return 1

    def process(self, vq, mem):
        self.calls += 1
        chain = vq.pop(mem)
        if chain is None:
            return False
        vq.push(chain, 0)
        return True


async def test_item1_work_left_is_resumed_after_other_callbacks(tmp_path):
    dev = OnePerCall()
    path = str(tmp_path / "one.sock")
    srv = Server(path, dev)
    srv.start()
    ram = GuestRam(1 << 20)
    fe = await Frontend.connect(path)
    await fe.init(1)
    q = DriverQueue(ram, 0, 64)
    await fe.start(ram, 1 << C.VIRTIO_F_VERSION_1, [q])
    loop = asyncio.get_running_loop()
    ticks = []
    activity = []
    srv.on_activity = lambda: activity.append(dev.calls)

    def tick():                                # another ready callback: it must get turns
        ticks.append(dev.calls)
        if len(ticks) < 100:
            loop.call_soon(tick)
    for _ in range(40):
        q.add([(ram.alloc(8), 8, False)])
    q.kick()
    loop.call_soon(tick)
    await until(lambda: q.used_idx() == 40)
    assert dev.calls >= 40
    # the 40 chains went out over many loop iterations, interleaved with the other callback
    assert len(set(t for t in ticks if 0 < t < 40)) > 10
    assert len(activity) >= 40
    await fe.close()
    await srv.close()
    q.close()
    ram.close()


async def test_item1_guest_error_logs_are_rate_limited(server, sock_path, ram, caplog):
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    guest = BalloonGuest(fe, ram)
    await guest.probe()
    q = guest.queues["inflate"]
    bad = ram.alloc(4)
    ram.at(bad, 4)[:] = (0xFFFFFFF0).to_bytes(4, "little")       # a pfn outside RAM
    for batch in range(1, 4):
        for _ in range(60):
            q.add([(bad, 4, False)])
        q.kick()
        await until(lambda: q.used_idx() == 60 * batch)
        q.reap()
    lines = [r for r in caplog.records if "inflate-pfn-outside-ram" in r.getMessage()]
    assert 1 <= len(lines) <= 12, len(lines)      # one line per batch now, at most the burst
    await fe.close()
    guest.close()


# -- #9 --------------------------------------------------------------------------------------

async def test_item9_guest_ram_truncated_then_kick_closes_the_connection(server, sock_path,
                                                                          caplog):
    ram = GuestRam(64 << 20)
    fe = await Frontend.connect(sock_path)
    await fe.init(6)
    guest = BalloonGuest(fe, ram)
    await guest.probe()
    await guest.inflate(10)
    q = guest.queues["inflate"]
    q.add([(guest._pfn_buf, 4, False)])
    os.ftruncate(ram.fd, 1 << 20)          # the front-end shrinks guest RAM under the daemon
    q.kick()
    await until(lambda: server.connection is None)
    assert "mem-region-truncated" in caplog.text
    await fe.close()
    guest.close()
    ram.close()
    fe2 = await Frontend.connect(sock_path)  # and the next front-end is served
    await fe2.init(6)
    await fe2.close()


# -- #3 --------------------------------------------------------------------------------------

_EXIT = """
import asyncio, os, tempfile
from vballoon.devices.balloon.device import Balloon
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.vhost.transport import Server

async def main():
    path = os.path.join(tempfile.mkdtemp(), "vb.sock")
    srv = Server(path, Balloon())
    srv.start()
    ram = GuestRam(16 << 20)
    fe = await Frontend.connect(path)
    await fe.init(6)
    g = BalloonGuest(fe, ram)
    await g.probe()
    await g.inflate(10)
    # leave everything mapped and connected: the interpreter tears it all down
    global keep
    keep = (srv, ram, fe, g)

asyncio.run(main())
print("exiting")
"""


def test_item3_no_crash_at_exit_with_guest_ram_still_mapped():
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _EXIT], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "exiting" in p.stdout, (p.returncode, p.stderr[-2000:])
