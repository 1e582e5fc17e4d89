"""Fuzz: the balloon's queues fed hostile chains, through in-memory rings (no socket).

Each case builds a fresh rig, fills the guest's data pages with a pattern, and plays a random
sequence of chains on random queues: well-formed and malformed buffers, wrong directions, pfns
inside and outside RAM, and raw descriptor tables with arbitrary addresses, lengths, flags and
next pointers.  Invariants after every case:

- nothing escapes but :class:`GuestError` (which breaks only that queue);
- guest RAM outside the pages named by inflate buffers or reporting buffers is untouched
  (hinted and bitmap-reported pages are never discarded);
- the device's books agree (its inflated-page count is the size of its page set), it still
  answers every API call, and its deadline is a number or None.
"""
from __future__ import annotations

import numpy as np
from balloonrig import MiB, PAGE, Rig
from fuzzing import budget
from hypothesis import given, strategies as st

from vballoon.errors import ConfigError, GuestError
from vballoon.wire import C

DATA_LO = 2 * MiB          # the pattern lives in [DATA_LO, RAM_END); the driver below it
RAM_END = 8 * MiB
PATTERN = np.frombuffer(b"vballoon-fuzz-pg" * (PAGE // 16), dtype=np.uint8)
ROLES = ["inflate", "deflate", "stats", "hint", "reporting", "bitmap"]

pfn = st.one_of(st.integers(DATA_LO // PAGE, RAM_END // PAGE - 1),
                st.integers(0, 0xFFFFFFFF), st.sampled_from([0, RAM_END // PAGE, 0xFFFFFFFF]))
data_addr = st.integers(DATA_LO, RAM_END - 1)
length = st.one_of(st.integers(0, 64), st.sampled_from([4, 10, 16, 32, PAGE, 4 * MiB]),
                   st.integers(0, 1 << 20))


@st.composite
def chain(draw):
    role = draw(st.sampled_from(ROLES))
    kind = draw(st.sampled_from(["pfns", "buffers", "bytes", "raw"]))
    return role, kind, draw(st.data())


def build(rig, role, kind, data, allowed):
    q = rig.driver[role]
    if kind == "pfns":                                    # a pfn array, maybe odd-sized
        pfns = data.draw(st.lists(pfn, max_size=64))
        raw = np.asarray(pfns, dtype="<u4").tobytes() + bytes(data.draw(st.integers(0, 3)))
        gpa = rig.ram.alloc(max(len(raw), 1), 4)
        rig.ram.at(gpa, len(raw))[:] = raw
        if role in ("inflate", "reporting"):
            allowed.update(pfns)
        q.add([(gpa, len(raw), data.draw(st.booleans()))])
    elif kind == "buffers":                               # buffers pointing into the data pages
        bufs = data.draw(st.lists(st.tuples(data_addr, length, st.booleans()), min_size=1,
                                  max_size=4))
        bufs = [(a, min(n, RAM_END - a), w) for a, n, w in bufs]
        if role in ("reporting", "inflate"):
            for a, n, _ in bufs:
                allowed.update(range(a // PAGE, (a + n + PAGE - 1) // PAGE))
        if role == "bitmap":                              # the device writes requests here
            for a, n, w in bufs:
                if w:
                    allowed.update(range(a // PAGE, (a + min(n, 16) + PAGE - 1) // PAGE))
        q.add(bufs, indirect=data.draw(st.booleans()))
    elif kind == "bytes":                                 # a small device-readable payload
        raw = data.draw(st.binary(max_size=96))
        gpa = rig.ram.alloc(max(len(raw), 1), 8)
        rig.ram.at(gpa, len(raw))[:] = raw
        q.add([(gpa, len(raw), data.draw(st.booleans()))])
    else:                                                 # raw descriptors, any values
        for i in data.draw(st.lists(st.integers(0, q.num - 1), min_size=1, max_size=4,
                                    unique=True)):
            addr = data.draw(st.one_of(data_addr, st.integers(0, (1 << 64) - 1)))
            flags = data.draw(st.integers(0, 7))
            n = data.draw(length)
            if flags & C.VRING_DESC_F_WRITE and role in ("reporting", "inflate", "bitmap") \
                    and DATA_LO <= addr < RAM_END:
                allowed.update(range(addr // PAGE, (min(addr + n, RAM_END) + PAGE - 1) // PAGE))
            q.write_desc(i, addr, n, flags, data.draw(st.integers(0, q.num)))
            if role == "inflate" and DATA_LO <= addr < RAM_END:
                allowed.update(range(DATA_LO // PAGE, RAM_END // PAGE))   # any pfn may be named
        q.publish(data.draw(st.integers(0, q.num)))


@budget()
@given(chains=st.lists(chain(), min_size=1, max_size=12), rounds=st.lists(
    st.sampled_from(["bitmap", "hint", "stats", "time", "target"]), max_size=4))
def test_fuzz_balloon_queues_survive_hostile_chains(chains, rounds):
    with Rig([(0, RAM_END)], queue_size=16, stats_interval=1) as rig:
        ram = np.frombuffer(rig.ram.mm, dtype=np.uint8)
        ram[DATA_LO:RAM_END] = np.tile(PATTERN, (RAM_END - DATA_LO) // PAGE)
        allowed: set[int] = set()
        broken: set[str] = set()
        for step, (role, kind, data) in enumerate(chains):
            if step < len(rounds):
                what = rounds[step]
                try:
                    if what in ("bitmap", "hint"):
                        rig.dev.start_round(what)
                    elif what == "stats":
                        rig.dev.request_stats()
                    elif what == "time":
                        rig.clock.now += 31
                        rig.dev.handle_timer(rig.clock.now)
                    else:
                        rig.dev.set_target(100)
                except (ConfigError, GuestError):
                    pass
            if role in broken:
                continue
            try:
                build(rig, role, kind, data, allowed)
            except (RuntimeError, MemoryError, ValueError):
                continue                      # the driver ran out of descriptors or memory
            try:
                rig.run(role)
            except GuestError:
                broken.add(role)              # the session marks the queue broken
        pages = ram[DATA_LO:RAM_END].reshape(-1, PAGE)
        changed = np.flatnonzero((pages != PATTERN).any(axis=1)) + DATA_LO // PAGE
        del ram, pages                        # the mapping's exports end here
        assert set(changed.tolist()) <= allowed, sorted(set(changed.tolist()) - allowed)[:8]
        assert rig.dev.counters.inflated_pages == rig.dev.inflated.count()
        d = rig.dev.next_deadline()
        assert d is None or isinstance(d, float)
        rig.dev.handle_timer(rig.clock.now + 100)
        rig.dev.driver_restarted()
        assert rig.dev.inflated.count() == 0
