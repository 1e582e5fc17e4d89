"""Fuzz: bitmap-queue chunks against a small model written from ``protocol/bitmap-queue.md``
(§5 states, §6 rules in order, §3.3 bit order), not from the device's code.

A case is a sequence of steps -- request a round, let time pass, send a chunk whose header
fields are drawn around every rule's edges and whose bytes are split into random descriptors
-- played on :class:`vballoon.fpmap.BitmapRounds` and on the model.  After every step the
verdict, the round's state and, at the end, the free and covered pages must agree.
"""
from __future__ import annotations

import numpy as np
from fuzzing import budget
from hypothesis import event, given, strategies as st

from vballoon.fpmap import BitmapRounds
from vballoon.fpmap.map import CHUNK_HEADER

PAGE = 4096
MAX_CHUNK_PFNS = 8388608
TIMEOUT = 5.0


class Model:
    """The spec, literally: ids from 1, one current round, rules 1-13 in order."""

    def __init__(self, ram):                 # ram: [(start_pfn, end_pfn)]
        self.ram = ram
        self.max_pfn = max(b for _, b in ram)
        self.next_id = 1
        self.cur = None                       # dict(id, state, last, free:set, cov:set)

    def is_ram(self, p):
        return any(a <= p < b for a, b in self.ram)

    def request(self, now):
        if self.cur and self.cur["state"] in ("requested", "receiving"):
            self.cur["state"] = "aborted"
        self.cur = dict(id=self.next_id, state="requested", last=now, free=set(), cov=set())
        self.next_id += 1

    def tick(self, now):
        c = self.cur
        if c and c["state"] in ("requested", "receiving") and now - c["last"] >= TIMEOUT:
            c["state"] = "aborted"

    def chunk(self, raw: bytes, writable: int, now):
        if writable:
            return "chunk-writable"
        if len(raw) < 32:
            return "chunk-short-header"
        cmd, shift, flags, _res, rid, start, nr = CHUNK_HEADER.struct.unpack_from(raw)
        if cmd != 1:
            return "chunk-cmd"
        if flags & ~1:
            return "chunk-flags"
        if self.cur is None:
            return "chunk-no-round"
        if not 1 <= rid < self.next_id:
            return "chunk-unknown-id"
        if rid != self.cur["id"]:
            return "chunk-stale-id"
        if self.cur["state"] not in ("requested", "receiving"):
            return "chunk-round-closed"
        if shift != 12:
            return "chunk-page-shift"
        if start % 64:
            return "chunk-start-unaligned"
        if nr > MAX_CHUNK_PFNS:
            return "chunk-too-long"
        if start + nr > self.max_pfn:
            return "chunk-pfn-range"
        if len(raw) - 32 != (nr + 63) // 64 * 8:
            return "chunk-length"
        bits = np.unpackbits(np.frombuffer(raw[32:], dtype=np.uint8), bitorder="little")[:nr]
        for k in np.flatnonzero(bits).tolist():
            if self.is_ram(start + k):
                self.cur["free"].add(start + k)
        self.cur["cov"].update(p for p in range(start, start + nr) if self.is_ram(p))
        self.cur["last"] = now
        if flags & 1:
            self.cur["state"] = "done"
            return "done"
        self.cur["state"] = "receiving"
        return "accepted"


LAYOUTS = [[(0, 1 << 20)], [(0, 640 << 10), (1 << 20, 512 << 10)],
           [(4096, 100 * 4096 + 17)], [(0, 256 << 10), (64 << 20, 256 << 10)]]


@st.composite
def chunk(draw, max_pfn, next_id):
    cmd = draw(st.sampled_from([1] * 12 + [0, 2]))
    shift = draw(st.sampled_from([12] * 12 + [16]))
    flags = draw(st.sampled_from([0] * 6 + [1] * 4 + [2, 3]))
    rid = max(0, draw(st.sampled_from([next_id - 1] * 8 + [next_id - 2, next_id, 0,
                                                           (1 << 64) - 1])))
    start = draw(st.one_of(st.integers(0, max_pfn // 64).map(lambda w: 64 * w),
                           st.integers(0, max_pfn // 64).map(lambda w: 64 * w),
                           st.integers(0, max_pfn + 64),
                           st.sampled_from([max_pfn - 64, (1 << 64) - 64])))
    start = max(0, min(start, (1 << 64) - 1))
    nr = draw(st.one_of(st.integers(0, 1024), st.integers(0, 1024),
                        st.integers(0, max(0, max_pfn - start)), st.integers(0, max_pfn + 64),
                        st.sampled_from([0, 1, 63, 64, 65, MAX_CHUNK_PFNS + 1,
                                         (1 << 64) - 1])))
    nr = max(0, nr)
    nbytes = (min(nr, 1 << 16) + 63) // 64 * 8 + draw(st.sampled_from([0] * 12 + [-8, 8, 1]))
    bits = draw(st.binary(min_size=max(0, min(nbytes, 2048)), max_size=max(0, min(nbytes, 2048))))
    if nbytes > 2048:
        bits += bytes(nbytes - 2048)
    raw = CHUNK_HEADER.pack(cmd, shift, flags, 0, rid, start, nr) + bits
    if draw(st.integers(0, 29)) == 0:
        raw = raw[:draw(st.integers(0, 31))]
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    writable = draw(st.sampled_from([0] * 29 + [16]))
    return raw, [p for p in pieces if p] or [b""], writable


@budget(2)
@given(layout=st.sampled_from(LAYOUTS), data=st.data())
def test_fuzz_bitmap_chunks_match_the_spec_model(layout, data):
    dev = BitmapRounds(layout)
    ram = [(-(-g // PAGE), (g + s) // PAGE) for g, s in sorted(layout)]
    model = Model([(a, b) for a, b in ram if a < b])
    now = 0.0
    for i in range(data.draw(st.integers(1, 12))):
        step = data.draw(st.sampled_from(["request", "chunk", "chunk", "chunk", "time"]))
        if i == 0 and data.draw(st.integers(0, 9)):
            step = "request"
        if step == "request":
            dev.request(now)
            model.request(now)
        elif step == "time":
            now += data.draw(st.sampled_from([0.5, 4.9, 5.0, 10.0]))
            dev.expire(now)
            model.tick(now)
        else:
            raw, pieces, writable = data.draw(chunk(model.max_pfn, model.next_id))
            pieces = [p if p else b"" for p in pieces]
            got = dev.receive([memoryview(bytearray(p)) for p in pieces if p] or
                              [memoryview(bytearray())], writable, now=now)
            want = model.chunk(raw, writable, now)
            event(want)
            assert got.value == want, (got, want)
        if model.cur is not None:
            assert dev.current.id == model.cur["id"]
            assert dev.current.state.value == model.cur["state"]
    if model.cur is not None:
        m = dev.current.map
        assert m.free_pages() == len(model.cur["free"])
        assert m.covered_pages() == len(model.cur["cov"])
        want = sorted(model.cur["free"])
        got = [p for a, n in m.ranges().tolist() for p in range(a, a + n)]
        assert got == want
