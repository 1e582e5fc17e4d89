"""Differential fuzzing of the C chain walk against a model written from the spec
(``vhost_vring_model.py``), with hostile descriptor tables, indirect tables in guest memory and
sparse region tables.  Budget: ``VBALLOON_FUZZ_EXAMPLES`` (default 200: a few seconds); a long
run: ``VBALLOON_FUZZ_EXAMPLES=100000 python -m pytest tests/fuzz -k vhost``.
The same cases run against an AddressSanitizer build in ``test_fuzz_vhost_asan.py``."""
from __future__ import annotations

import os
import struct
import sys

from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from vhost_vring_model import run_c, walk  # noqa: E402

from vballoon.virtio._vring import ffi, lib  # noqa: E402

EXAMPLES = int(os.environ.get("VBALLOON_FUZZ_EXAMPLES", "200"))
R0, R1 = 0x1000, 0x100000           # two regions with a hole between them
R0_SIZE, R1_SIZE = 1024, 256


def _addr():
    inside = st.integers(R0, R0 + R0_SIZE - 64)
    return st.one_of(
        inside, inside, inside,
        st.integers(R0, R0 + R0_SIZE + 16),                 # in (and just past) region 0
        st.integers(R1 - 16, R1 + R1_SIZE + 16),            # around region 1
        st.sampled_from([0, R0 - 1, R0 + R0_SIZE - 16, 2**64 - 1, 2**64 - 16, 2**63]),
        st.integers(0, 2**64 - 1))


def _len():
    small = st.sampled_from([0, 1, 8, 16, 32, 48, 64, 128, 256])
    return st.one_of(small, small, small, st.sampled_from([1024, 2**31, 2**32 - 1]),
                     st.integers(0, 2**32 - 1))


def _desc(num):
    flags = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 7), st.integers(0, 0xFFFF))
    nxt = st.one_of(st.integers(0, num + 1), st.integers(0, 0xFFFF))
    return st.builds(lambda a, n, f, x: struct.pack("<QIHH", a, n, f, x), _addr(), _len(), flags,
                     nxt)


@st.composite
def cases(draw):
    num = draw(st.sampled_from([1, 2, 4, 8, 16]))
    table = b"".join(draw(st.lists(_desc(num), min_size=num, max_size=num)))
    # guest memory: descriptors (for indirect tables) or random bytes
    r0 = b"".join(draw(st.lists(_desc(num), max_size=6)))
    r0 = r0.ljust(R0_SIZE, b"\0")[:R0_SIZE]
    r1 = draw(st.binary(max_size=64)).ljust(R1_SIZE, b"\0")
    both = [(R0, r0), (R1, r1)]
    regions = draw(st.sampled_from([both, both, both, both, [(R0, r0)], [(R1, r1)], []]))
    head = draw(st.integers(0, num - 1)) if draw(st.integers(0, 9)) else draw(st.integers(0, 0xFFFF))
    return table, num, head, bool(draw(st.integers(0, 4))), regions


def check(case, ffi_, lib_):
    table, num, head, indirect_ok, regions = case
    want = walk(table, num, head, indirect_ok, regions)
    got = run_c(ffi_, lib_, table, num, head, indirect_ok, regions)
    assert got == want, (case, got, want)
    return want[0]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_fuzz_vhost_chain_walk_agrees_with_the_spec_model(case):
    from hypothesis import event
    event(f"result {check(case, ffi, lib)}")
