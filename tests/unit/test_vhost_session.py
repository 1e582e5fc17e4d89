"""Reliability rules of the sans-IO session (issue 10), one named test per item.

The harness carries out the actions a transport would (closing fds), so fd counts are real."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from vballoon.devices.balloon.device import Balloon
from vballoon.sim import DriverQueue, GuestRam
from vballoon.vhost.fds import signal_eventfd
from vballoon.testing.rigs import SessionRig
from vballoon.vhost.session import F_PROTOCOL_FEATURES, CloseFds, Resume, Signal, Unwatch, Watch
from vballoon.virtio.device import Device
from vballoon.wire import C, MEM_REGION, MEMORY, U64, VRING_ADDR, VRING_STATE
from vbtest import fd_table as open_fds

NEED = C.VHOST_USER_VERSION | C.VHOST_USER_NEED_REPLY_MASK
V1 = C.VHOST_USER_VERSION


Harness = SessionRig


@pytest.fixture
def h():
    x = Harness()
    yield x
    x.close()




def eventfd(flags=os.EFD_NONBLOCK):
    return os.eventfd(0, flags | os.EFD_CLOEXEC)


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def mem_table(*regions):
    return MEMORY.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)


def table_of(ram):
    return mem_table(*[(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                       for r in ram.regions])


def maps_of(name):
    with open("/proc/self/maps") as f:
        return sum(f"/memfd:{name}" in line for line in f)


# -- #11 -------------------------------------------------------------------------------------

def test_item11_unaligned_region_refused_at_set_mem_table(h, caplog):
    h.negotiate()
    ram = GuestRam(1 << 20)
    fd = os.dup(ram.fd)
    assert h.ack(C.VHOST_USER_SET_MEM_TABLE, mem_table((0x800, 1 << 19, 1 << 30, 0)), [fd]) != 0
    assert "mem-region-unaligned" in caplog.text
    assert not is_open(fd) and not h.closed() and h.s.mem is None
    ram.close()


# -- #6 --------------------------------------------------------------------------------------

def test_item6_non_socket_backend_fd_refused(h, caplog):
    h.negotiate()
    before = open_fds()
    for _ in range(20):                 # one per config change in the report: no leak
        r, w = os.pipe()
        assert h.ack(C.VHOST_USER_SET_BACKEND_REQ_FD, fds=[w]) != 0
        assert not is_open(w)
        os.close(r)
    assert "fd-not-socket" in caplog.text
    assert not h.s.has_backend and open_fds() == before
    h.device.config_changed()           # nothing to send on, nothing fails


# -- #7 --------------------------------------------------------------------------------------

def test_item7_fds_of_a_failed_message_are_closed_exactly_once(h, tmp_path):
    h.negotiate()
    path = tmp_path / "f"
    path.write_bytes(b"x")
    before = open_fds()
    for _ in range(20):
        fds = [os.open(path, os.O_RDONLY), eventfd(), eventfd()]
        assert h.ack(C.VHOST_USER_SET_VRING_KICK, U64.pack(0), fds) != 0
        assert not any(is_open(fd) for fd in fds)
    assert open_fds() == before


class Buggy(Balloon):
    """A device with a bug in the named method."""

    def __init__(self, where):
        super().__init__()
        self.where = where

    def _maybe(self, name):
        if self.where == name:
            raise RuntimeError(f"bug in {name}")

    def memory_changed(self, mem):
        super().memory_changed(mem)
        self._maybe("memory_changed" if mem is not None else "memory_changed_none")

    def reset(self):
        super().reset()
        self._maybe("reset")

    def queue_stopped(self, vq):
        super().queue_stopped(vq)
        self._maybe("queue_stopped")

    def set_features(self, acked):
        super().set_features(acked)
        self._maybe("set_features")


def test_item7_fds_of_a_message_whose_handler_has_a_bug_are_closed(tmp_path):
    x = Harness(Buggy("set_features"))
    fds = [eventfd(), eventfd()]
    reply = x.send(C.VHOST_USER_SET_FEATURES, U64.pack(1 << 32), fds, flags=NEED)
    assert U64.unpack_from(reply, 12)[0] != 0           # answered, not a dropped connection
    assert not any(is_open(fd) for fd in fds)
    x.close()


# -- #8 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_", [C.VHOST_USER_SET_VRING_CALL, C.VHOST_USER_SET_VRING_ERR,
                                      C.VHOST_USER_SET_VRING_KICK])
def test_item8_received_eventfds_are_made_non_blocking(h, request_):
    h.negotiate()
    fd = eventfd(0)                     # blocking, as a careless front-end makes it
    assert os.get_blocking(fd)
    assert h.ack(request_, U64.pack(0), [fd]) == 0
    assert not os.get_blocking(fd)
    if request_ != C.VHOST_USER_SET_VRING_KICK:
        os.write(fd, (0xFFFFFFFFFFFFFFFE).to_bytes(8, "little"))    # a full counter
        assert signal_eventfd(fd)       # returns at once (EAGAIN: a signal is pending anyway)


# -- #12 -------------------------------------------------------------------------------------

def test_item12_pipe_kick_fd_refused(h, caplog):
    h.negotiate()
    r, w = os.pipe()
    os.close(w)                         # at end of file: would be readable forever
    assert h.ack(C.VHOST_USER_SET_VRING_KICK, U64.pack(0), [r]) != 0
    assert "fd-not-eventfd" in caplog.text and not is_open(r)
    assert not any(isinstance(a, Watch) for a in h.actions)


def test_item12_kick_fd_failure_breaks_the_ring_once(h, caplog):
    h.negotiate()
    kick, err = eventfd(), eventfd()
    h.send(C.VHOST_USER_SET_VRING_ERR, U64.pack(0), [err])
    h.send(C.VHOST_USER_SET_VRING_KICK, U64.pack(0), [kick])
    for _ in range(5):
        h.s.kick_failed(0, "end of file")
    assert caplog.text.count("kick-fd-failed") == 1
    assert [type(a) for a in h.actions[-3:]] == [Unwatch, CloseFds, Signal]
    assert not is_open(kick) and h.s.queue_status()[0].broken
    assert os.eventfd_read(err) == 1


# -- #15 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,fdkind,rule", [
    ((0x800, 1 << 19, 1 << 30, 0), "ram", "mem-region-unaligned"),
    ((0, 0, 1 << 30, 0), "ram", "mem-region-empty"),
    ((0, 1 << 20, 1 << 30, 1 << 20), "ram", "mem-region-past-fd"),
    ((0, 1 << 62, 1 << 30, 0), "ram", "mem-region-past-fd"),
    ((2**64 - 4096, 1 << 20, 0, 0), "ram", "mem-region-overflow"),
    ((0, 1 << 20, 1 << 30, 0), "pipe", "mem-region-"),
    ((0, 1 << 20, 1 << 30, 0), "eventfd", "mem-region-"),
    ((0, 1 << 20, 1 << 30, 0), "dir", "mem-region-"),
    ((0, 4096, 1 << 30, 0), "emptyfile", "mem-region-past-fd"),
])
def test_item15_bad_memory_layouts_get_error_replies(h, caplog, tmp_path, layout, fdkind, rule):
    h.negotiate()
    ram = GuestRam(1 << 20)
    if fdkind == "ram":
        fd = os.dup(ram.fd)
    elif fdkind == "pipe":
        fd, w = os.pipe()
        os.close(w)
    elif fdkind == "eventfd":
        fd = eventfd()
    elif fdkind == "dir":
        fd = os.open(tmp_path, os.O_RDONLY)
    else:
        (tmp_path / "e").write_bytes(b"")
        fd = os.open(tmp_path / "e", os.O_RDWR)
    before = {(n, t) for n, t in open_fds() if n != str(fd)}
    assert h.ack(C.VHOST_USER_SET_MEM_TABLE, mem_table(layout), [fd]) != 0
    assert rule in caplog.text and "Traceback" not in caplog.text
    assert not h.closed() and open_fds() == before
    assert h.ack(C.VHOST_USER_SET_MEM_TABLE, table_of(ram), [os.dup(ram.fd)]) == 0   # goes on
    ram.close()


def test_item15_regular_file_kick_fd_gets_an_error_reply(h, caplog, tmp_path):
    h.negotiate()
    (tmp_path / "k").write_bytes(bytes(8))
    fd = os.open(tmp_path / "k", os.O_RDONLY)
    assert h.ack(C.VHOST_USER_SET_VRING_KICK, U64.pack(0), [fd]) != 0
    assert "fd-not-eventfd" in caplog.text and not h.closed() and not is_open(fd)


# -- #3 --------------------------------------------------------------------------------------

def test_item3_device_bug_at_set_mem_table_still_answers(caplog):
    x = Harness(Buggy("memory_changed"))
    x.negotiate()
    ram = GuestRam(1 << 20, name="item3-a")
    assert x.ack(C.VHOST_USER_SET_MEM_TABLE, table_of(ram), [os.dup(ram.fd)]) != 0
    assert "internal-error" in caplog.text
    assert x.ack(C.VHOST_USER_GET_FEATURES.__class__(C.VHOST_USER_SET_OWNER)) == 0   # answers
    before = maps_of("item3-a")
    x.close()
    assert maps_of("item3-a") == before - 1       # the session's mapping is gone
    ram.close()


@pytest.mark.parametrize("where", ["reset", "queue_stopped", "memory_changed_none"])
def test_item3_device_bug_at_disconnect_still_closes_every_fd_and_unmaps(where, caplog):
    x = Harness(Buggy(where))
    x.negotiate()
    ram = GuestRam(1 << 20, name="item3-b")
    before_fds, before_maps = open_fds(), maps_of("item3-b")
    x.send(C.VHOST_USER_SET_FEATURES, U64.pack(1 << 32 | F_PROTOCOL_FEATURES))
    assert x.ack(C.VHOST_USER_SET_MEM_TABLE, table_of(ram), [os.dup(ram.fd)]) == 0
    dq = DriverQueue(ram, 0, 8)
    x.send(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 8))
    x.send(C.VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(0, 0, ram.uva(dq.desc), ram.uva(dq.used),
                                                        ram.uva(dq.avail), 0))
    fds = [eventfd() for _ in range(3)]
    x.send(C.VHOST_USER_SET_VRING_KICK, U64.pack(0), [fds[0]])
    x.send(C.VHOST_USER_SET_VRING_CALL, U64.pack(0), [fds[1]])
    x.send(C.VHOST_USER_SET_VRING_ERR, U64.pack(0), [fds[2]])
    x.send(C.VHOST_USER_SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
    x.s.kick(0)                                   # the ring runs
    assert x.s.queue_status()[0].running
    x.close()
    assert "internal-error" in caplog.text
    assert not any(is_open(fd) for fd in fds)
    assert maps_of("item3-b") == before_maps
    dq.close()
    assert open_fds() == before_fds
    ram.close()


class Raising(Device):
    device_id = 99

    def max_queues(self):
        return 2

    def process(self, vq, mem):
        raise RuntimeError("bug in process")


def test_item3_device_bug_in_process_breaks_only_that_queue(caplog):
    x = Harness(Raising())
    ram = GuestRam(1 << 20)
    x.send(C.VHOST_USER_SET_FEATURES, U64.pack(0))
    x.send(C.VHOST_USER_SET_MEM_TABLE, table_of(ram), [os.dup(ram.fd)])
    dq = DriverQueue(ram, 0, 8)
    err = eventfd()
    x.send(C.VHOST_USER_SET_VRING_ERR, U64.pack(0), [err])
    x.send(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 8))
    x.send(C.VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(0, 0, ram.uva(dq.desc), ram.uva(dq.used),
                                                        ram.uva(dq.avail), 0))
    x.s.kick(0)                                   # must not raise
    assert x.s.queue_status()[0].broken and not x.s.queue_status()[1].broken
    assert os.eventfd_read(err) == 1
    x.close()
    dq.close()
    ram.close()


# -- #1 --------------------------------------------------------------------------------------

class Bounded(Device):
    """Handles one chain per call and says whether more remain (the per-call bound)."""
    device_id = 99

    def __init__(self):
        super().__init__()
        self.calls = 0

    def max_queues(self):
        return 1

    def process(self, vq, mem):
        self.calls += 1
        chain = vq.pop(mem)
        if chain is None:
            return False
        vq.push(chain, 0)
        return True


def test_item1_more_work_is_asked_for_not_looped():
    x = Harness(Bounded())
    ram = GuestRam(1 << 20)
    x.send(C.VHOST_USER_SET_FEATURES, U64.pack(0))
    x.send(C.VHOST_USER_SET_MEM_TABLE, table_of(ram), [os.dup(ram.fd)])
    dq = DriverQueue(ram, 0, 8)
    x.send(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 8))
    x.send(C.VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(0, 0, ram.uva(dq.desc), ram.uva(dq.used),
                                                        ram.uva(dq.avail), 0))
    x.send(C.VHOST_USER_SET_VRING_KICK, U64.pack(0), [eventfd()])
    for _ in range(3):
        dq.add([(ram.alloc(8), 8, False)])
    x.s.kick(0)
    assert x.device.calls == 1 and isinstance(x.actions[-1], Resume)
    x.s.resume(0)
    x.s.resume(0)
    x.s.resume(0)                                 # the empty ring: no more Resume
    assert x.device.calls == 4 and len(dq.reap()) == 3
    assert sum(isinstance(a, Resume) for a in x.actions) == 3
    x.send(C.VHOST_USER_GET_VRING_BASE, VRING_STATE.pack(0, 0))
    x.s.resume(0)                                 # stopped meanwhile: a stale Resume is a no-op
    assert x.device.calls == 4
    x.close()
    dq.close()
    ram.close()


# -- #9 --------------------------------------------------------------------------------------

_SIGBUS_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]
    from test_vhost_session import Harness, table_of, eventfd
    from vballoon.devices.balloon import Balloon
    from vballoon.sim import DriverQueue, GuestRam
    from vballoon.vhost.session import Close
    from vballoon.wire import C, U64, VRING_ADDR, VRING_STATE

    x = Harness(Balloon())
    ram = GuestRam(4 << 20)
    x.send(C.VHOST_USER_SET_FEATURES, U64.pack(1 << 32 | 1 << C.VIRTIO_BALLOON_F_STATS_VQ))
    x.send(C.VHOST_USER_SET_MEM_TABLE, table_of(ram), [os.dup(ram.fd)])
    dq = DriverQueue(ram, 0, 8)
    x.send(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 8))
    x.send(C.VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(0, 0, ram.uva(dq.desc),
                                                        ram.uva(dq.used), ram.uva(dq.avail), 0))
    pfns = ram.alloc(4)
    dq.add([(pfns, 4, False)])
    os.ftruncate(ram.fd, 0)               # the front-end shrinks guest RAM under us
    x.s.kick(0)                           # SIGBUS here, unless the session checks first
    assert any(isinstance(a, Close) for a in x.actions), x.actions
    x.close()
    print("survived")
""")


def test_item9_truncated_guest_ram_closes_the_connection_not_the_process(tmp_path):
    script = tmp_path / "sigbus.py"
    script.write_text(_SIGBUS_SCRIPT.format(tests=os.path.dirname(__file__)))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)),
                       env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
    assert p.returncode == 0 and "survived" in p.stdout, (p.returncode, p.stderr[-2000:])
    assert "mem-region-truncated" in p.stderr


def test_item9_sealed_memfd_is_not_checked_at_each_kick():
    from vballoon.virtio.memory import GuestMemory
    ram = GuestRam(1 << 20)
    fd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    import fcntl
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    mem = GuestMemory.map([ram.regions[0]], [fd])
    assert mem.regions[0].sealed
    mem.check_backing()
    mem.close()
    mem = GuestMemory.map(ram.regions, [os.dup(ram.fd)])
    assert not mem.regions[0].sealed
    mem.check_backing()
    mem.close()
    ram.close()


def test_item1_rule_rate_limit_first_n_then_one_summary_per_second():
    import logging
    from vballoon.ratelimit import RuleRateLimit
    now = [0.0]
    f = RuleRateLimit(burst=3, interval=1.0, clock=lambda: now[0])

    def rec(msg, *args, level=logging.ERROR):
        return logging.LogRecord("x", level, __file__, 1, msg, args, None)
    passed = [f.filter(rec("%s-bad-pfn: pfn %d", "inflate", i)) for i in range(100)]
    assert passed.count(True) == 3                      # the burst, then silence
    assert f.filter(rec("other-rule: x"))               # rules are counted apart
    assert f.filter(rec("no rule here")) and f.filter(rec("x-y: debug", level=logging.DEBUG))
    now[0] = 1.5
    r = rec("%s-bad-pfn: pfn %d", "inflate", 7)
    assert f.filter(r) and "97 more like this suppressed" in r.getMessage()
    assert not f.filter(rec("%s-bad-pfn: pfn %d", "inflate", 8))
    now[0] = 100.0                                      # quiet for long: a fresh burst
    assert all(f.filter(rec("inflate-bad-pfn: again")) for _ in range(3))
