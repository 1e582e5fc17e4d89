"""Structure-aware fuzzing of the vhost-user session: sequences of front-end requests with fds
of every kind (eventfds, blocking ones, pipes, regular files, sockets, directories, the guest
RAM memfd), hostile memory tables and ring addresses, interleaved with kicks and a guest that
scribbles over its rings.  The actions are carried out as the transport would.

Invariants after every case: no exception escapes the session; every reply is well formed;
the session still answers unless it asked to close; once closed, the process's fds are back to
their baseline and no mapping of guest RAM is left.

Budget: ``VBALLOON_FUZZ_EXAMPLES`` (default 150: a few seconds); a long run:
``VBALLOON_FUZZ_EXAMPLES=100000 python -m pytest tests/fuzz -k vhost``."""
from __future__ import annotations

import os
import socket

from hypothesis import HealthCheck, event, given, settings, strategies as st

from vballoon.devices.balloon.device import Balloon
from vballoon.errors import ConfigError
from vballoon.sim import GuestRam
from vballoon.sim.driver import UVA_BASE
from vballoon.vhost.fds import signal_eventfd
from vballoon.vhost.session import (Close, CloseFds, Message, Resume, Session,
                                    SetBackendChannel, Signal, Unwatch, Watch)
from vballoon.wire import C, CONFIG, HEADER, MEM_REGION, MEMORY, U64, VRING_ADDR, VRING_STATE
from vbtest import fd_table as open_fds

EXAMPLES = int(os.environ.get("VBALLOON_FUZZ_EXAMPLES", "150"))
RAM = 256 << 10
V1, NEED = C.VHOST_USER_VERSION, C.VHOST_USER_NEED_REPLY_MASK
FD_KINDS = ["eventfd", "eventfd", "eventfd_blocking", "pipe", "file", "socket", "memfd", "dir"]




def guest_maps():
    with open("/proc/self/maps") as f:
        return sum("/memfd:fuzz-ram" in line for line in f)


# -- strategies: one step is (kind, details) ---------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
index = st.one_of(st.integers(0, 5), st.integers(0, 5), st.integers(0, 300))
fds = st.lists(st.sampled_from(FD_KINDS), max_size=3)
ring_off = st.one_of(st.sampled_from([0x1000, 0x2000, 0x3000, 0x4000, 0x8000, RAM - 16, RAM]),
                     st.integers(0, RAM + 4096))


def region():
    good = st.just((0, RAM, UVA_BASE, 0))
    half = st.just((0, RAM // 2, UVA_BASE, 0))
    high = st.just((1 << 32, RAM // 2, UVA_BASE + RAM // 2, RAM // 2))
    unaligned = st.just((0x800, RAM // 2, UVA_BASE, 0))
    rand = st.tuples(u64, u64, u64, u64)
    return st.one_of(good, good, half, high, unaligned, rand)


def msg(request, payload, fd_kinds=st.just([])):
    return st.tuples(st.just("msg"), st.just(request), payload, fd_kinds,
                     st.integers(0, 9))       # 0: truncate the payload, 1: extend it


def vring_fd_msg(request):
    value = st.builds(lambda i, nofd, junk: i | (0x100 if nofd else 0) | junk, index,
                      st.booleans(), st.sampled_from([0, 0, 0, 1 << 9, 1 << 40]))
    return msg(request, value.map(U64.pack), fds)


@st.composite
def mem_table(draw):
    regions = draw(st.lists(region(), min_size=0, max_size=3)) if draw(st.integers(0, 9)) \
        else draw(st.lists(region(), min_size=9, max_size=9))
    payload = MEMORY.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)
    kinds = ["memfd"] * len(regions) if draw(st.integers(0, 3)) else draw(fds)
    return ("msg", C.VHOST_USER_SET_MEM_TABLE, payload, kinds, draw(st.integers(0, 9)))


STEP = st.one_of(
    msg(C.VHOST_USER_GET_FEATURES, st.just(b"")),
    msg(C.VHOST_USER_SET_FEATURES, st.one_of(
        st.just(1 << 32 | 1 << 30 | 0x7F | 1 << 28 | 1 << 29), st.integers(0, 2**35)).map(U64.pack)),
    msg(C.VHOST_USER_SET_PROTOCOL_FEATURES, st.sampled_from([0x229, 0x29, 0, 1 << 16]).map(U64.pack)),
    msg(C.VHOST_USER_GET_PROTOCOL_FEATURES, st.just(b"")),
    msg(C.VHOST_USER_SET_OWNER, st.just(b""), fds),
    msg(C.VHOST_USER_RESET_OWNER, st.just(b"")),
    mem_table(),
    msg(C.VHOST_USER_SET_VRING_NUM, st.builds(VRING_STATE.pack, index,
                                               st.sampled_from([0, 1, 8, 16, 48, 32768, 65536]))),
    msg(C.VHOST_USER_SET_VRING_ADDR, st.builds(
        lambda i, f, d, u, a: VRING_ADDR.pack(i, f, UVA_BASE + d, UVA_BASE + u, UVA_BASE + a, 0),
        index, st.sampled_from([0, 0, 1, 2]), ring_off, ring_off, ring_off)),
    msg(C.VHOST_USER_SET_VRING_BASE, st.builds(VRING_STATE.pack, index, st.integers(0, 70000))),
    msg(C.VHOST_USER_GET_VRING_BASE, st.builds(VRING_STATE.pack, index, st.just(0))),
    vring_fd_msg(C.VHOST_USER_SET_VRING_KICK),
    vring_fd_msg(C.VHOST_USER_SET_VRING_CALL),
    vring_fd_msg(C.VHOST_USER_SET_VRING_ERR),
    msg(C.VHOST_USER_GET_QUEUE_NUM, st.just(b"")),
    msg(C.VHOST_USER_SET_VRING_ENABLE, st.builds(VRING_STATE.pack, index, st.integers(0, 2))),
    msg(C.VHOST_USER_SET_BACKEND_REQ_FD, st.just(b""), fds),
    msg(C.VHOST_USER_GET_CONFIG, st.builds(lambda o, n: CONFIG.pack(o, n, 0) + bytes(n),
                                           st.integers(0, 20), st.integers(0, 24))),
    msg(C.VHOST_USER_SET_CONFIG, st.builds(lambda o, n, f: CONFIG.pack(o, n, f) + bytes(n),
                                           st.integers(0, 20), st.integers(0, 8),
                                           st.integers(0, 2))),
    st.tuples(st.just("msg"), st.integers(0, 80), st.binary(max_size=48), fds,
              st.integers(2, 9)),                           # any request, any payload
    st.tuples(st.just("start"), st.integers(0, 5), st.sampled_from([1, 2, 8, 16])),
    st.tuples(st.just("start"), st.integers(0, 5), st.sampled_from([1, 2, 8, 16])),
    st.tuples(st.just("kick"), st.integers(0, 5)),
    st.tuples(st.just("kick"), st.integers(0, 5)),
    st.tuples(st.just("scribble"), st.integers(0, 0x9000 - 64), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("config"), st.integers(0, 1 << 20)),
)


class Front:
    """Makes fds of each kind and carries out the session's actions as the transport does."""

    def __init__(self, ram, tmp):
        self.ram, self.tmp = ram, tmp
        self.actions, self.owned, self.watched, self.resume = [], [], {}, []
        self.closing = False

    def make(self, kind):
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_NONBLOCK)
        if kind == "eventfd_blocking":
            return os.eventfd(0)
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return r
        if kind == "file":
            return os.open(self.tmp, os.O_RDONLY)
        if kind == "socket":
            a, b = socket.socketpair()
            b.close()
            return a.detach()
        if kind == "memfd":
            return os.dup(self.ram.fd)
        return os.open("/", os.O_RDONLY)

    def apply(self, a):
        self.actions.append(a)
        if isinstance(a, CloseFds):
            for fd in a.fds:
                os.close(fd)              # raises on a double close: exactly once
        elif isinstance(a, SetBackendChannel):
            self.owned.append(a.fd)
        elif isinstance(a, Signal):
            signal_eventfd(a.fd)
        elif isinstance(a, Watch):
            self.watched[a.index] = a.fd
        elif isinstance(a, Unwatch):
            assert self.watched.pop(a.index) == a.fd
        elif isinstance(a, Resume):
            self.resume.append(a.index)
        elif isinstance(a, Close):
            self.closing = True


def start_steps(i, num):
    """QEMU's sequence for ring ``i`` (rings at 0x1000 + i * 0x1000 of guest RAM)."""
    base = UVA_BASE + 0x1000 * (1 + i)
    m = lambda r, p, k=(): ("msg", r, p, list(k), 5)   # noqa: E731
    return [m(C.VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(0x229)),
            m(C.VHOST_USER_SET_FEATURES, U64.pack(1 << 32 | 1 << 30 | 0x3F | 1 << 28 | 1 << 29)),
            m(C.VHOST_USER_SET_MEM_TABLE, MEMORY.pack(1, 0)
              + MEM_REGION.pack(0, RAM, UVA_BASE, 0), ["memfd"]),
            m(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(i, num)),
            m(C.VHOST_USER_SET_VRING_BASE, VRING_STATE.pack(i, 0)),
            m(C.VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(i, 0, base, base + 0x800, base + 0x400, 0)),
            m(C.VHOST_USER_SET_VRING_KICK, U64.pack(i), ["eventfd"]),
            m(C.VHOST_USER_SET_VRING_CALL, U64.pack(i), ["eventfd"]),
            m(C.VHOST_USER_SET_VRING_ERR, U64.pack(i), ["eventfd"]),
            m(C.VHOST_USER_SET_VRING_ENABLE, VRING_STATE.pack(i, 1)),
            ("kick", i)]


def run_case(steps, tmp, record=False):
    # only new fds count: an earlier test's garbage may close one of its fds meanwhile
    baseline, maps = open_fds(), guest_maps()
    ram = GuestRam(RAM, name="fuzz-ram")
    fe = Front(ram, tmp)
    device = Balloon()                      # every feature offered: six queues
    s = Session(device, fe.apply)
    flat = []
    for step in steps:
        flat.extend(start_steps(step[1], step[2]) if step[0] == "start" else [step])
    try:
        for step in flat:
            if fe.closing:
                break
            if step[0] == "msg":
                _, request, payload, kinds, mutate = step
                if mutate == 0 and payload:
                    payload = payload[:-1]
                elif mutate == 1:
                    payload = payload + b"\0" * 4
                m = Message(request, V1 | NEED, payload, [fe.make(k) for k in kinds])
                reply = s.handle(m)
                assert not m.fds                   # every fd kept or released
                if reply is not None:
                    req, flags, size = HEADER.unpack_from(reply)
                    assert (req, flags, size) == (request, 0x5, len(reply) - 12)
            elif step[0] == "kick":
                if step[1] in fe.watched:
                    s.kick(step[1])
            elif step[0] == "scribble":
                ram.view[step[1]:step[1] + len(step[2])] = step[2]
            elif step[0] == "config":
                try:
                    device.set_target(step[1])       # a config change, announced on the channel
                except ConfigError:
                    pass
            for _ in range(20):                     # Resume, after the step as call_soon would
                if not fe.resume:
                    break
                s.resume(fe.resume.pop(0))
        if record:
            event(f"memory mapped: {s.mem is not None}")
            event(f"a queue ran: {any(q.running for q in s.queue_status())}")
            event(f"closed by the session: {fe.closing}")
        if not fe.closing:                          # still answers
            reply = s.handle(Message(C.VHOST_USER_GET_FEATURES, V1, b"", []))
            assert HEADER.unpack_from(reply) == (C.VHOST_USER_GET_FEATURES, 0x5, 8)
    finally:
        s.close()
        for fd in fe.owned:
            os.close(fd)
        ram.close()
    assert not fe.watched
    assert guest_maps() == maps
    assert open_fds() - baseline == set()


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(STEP, min_size=1, max_size=40))
def test_fuzz_vhost_session_message_sequences(tmp_path_factory, steps):
    tmp = tmp_path_factory.getbasetemp() / "fuzz-file"
    if not tmp.exists():
        tmp.write_bytes(bytes(64))
    run_case(steps, str(tmp), record=True)


# Cases found by the fuzzer (or written from its reports), kept as tests.
CORPUS = {
    "kick-fd-is-a-pipe": [("msg", C.VHOST_USER_SET_VRING_KICK, U64.pack(0), ["pipe"], 5)],
    "blocking-call-fd": [("msg", C.VHOST_USER_SET_VRING_CALL, U64.pack(0), ["eventfd_blocking"], 5)],
    "backend-fd-is-a-file": [("msg", C.VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(0x229), [], 5),
                             ("msg", C.VHOST_USER_SET_BACKEND_REQ_FD, b"", ["file", "eventfd"], 5),
                             ("config", 5)],
    "table-with-a-directory": [("msg", C.VHOST_USER_SET_MEM_TABLE,
                                MEMORY.pack(1, 0) + MEM_REGION.pack(0, RAM, UVA_BASE, 0),
                                ["dir"], 5)],
}


def test_fuzz_vhost_session_corpus(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(bytes(64))
    for name, steps in CORPUS.items():
        run_case(steps, str(f))
