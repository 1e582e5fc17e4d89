"""Guest memory rules added for reliability (issue 10): alignment (#11), sizes and seals (#9)."""
from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from vballoon.errors import FrontendError
from vballoon.sim import GuestRam
from vballoon.virtio.memory import GuestMemory, RegionSpec

PAGE = mmap.PAGESIZE


@pytest.mark.parametrize("field", ["guest_phys_addr", "memory_size", "userspace_addr",
                                   "mmap_offset"])
def test_item11_unaligned_region_refused(field):
    ram = GuestRam(1 << 20)
    spec = dict(guest_phys_addr=0, memory_size=(1 << 20) - PAGE, userspace_addr=1 << 30,
                mmap_offset=0)
    spec[field] += 0x800
    fd = os.dup(ram.fd)
    with pytest.raises(FrontendError) as e:
        GuestMemory.map([RegionSpec(**spec)], [fd])
    assert e.value.rule == "mem-region-unaligned"
    with pytest.raises(OSError):
        os.fstat(fd)                 # closed with the refusal
    ram.close()


def test_item11_discard_clips_to_whole_pages_inside_the_range():
    """Inflating pfn 0 never zeroes bytes outside the pfn, whatever the alignment of the range."""
    ram = GuestRam(1 << 20)
    ram.view[:4 * PAGE] = b"\xaa" * (4 * PAGE)
    mem = GuestMemory.map(ram.regions, [os.dup(ram.fd)])
    try:
        # half a page, then a range straddling pages 1 and 2: no whole page inside either
        calls, done = mem.discard(np.array([0x800, PAGE + 0x800], dtype=np.uint64),
                                  np.array([0x800, PAGE], dtype=np.uint64))
        assert done == 0
        assert bytes(ram.view[:4 * PAGE]) == b"\xaa" * (4 * PAGE)
        # a range of 2.5 pages starting mid-page: only the whole page inside goes
        calls, done = mem.discard(np.array([0x800], dtype=np.uint64),
                                  np.array([2 * PAGE], dtype=np.uint64))
        assert done == PAGE
        assert bytes(ram.view[PAGE:2 * PAGE]) == bytes(PAGE)
        assert bytes(ram.view[:PAGE]) == b"\xaa" * PAGE
        assert bytes(ram.view[2 * PAGE:4 * PAGE]) == b"\xaa" * (2 * PAGE)
    finally:
        mem.close()
        ram.close()
