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


_RACE = """
import os, sys
from vballoon.sim import GuestRam
from vballoon.virtio.memory import GuestMemory
from vballoon.errors import FrontendError
ram = GuestRam(1 << 20)
mem = GuestMemory.map(ram.regions, [os.dup(ram.fd)])
mem.check_backing()                     # whole
view = mem.gpa_view(0x8000, 16)
os.ftruncate(ram.fd, 0)                 # truncated after the check: the access faults
data = bytes(view)                      # SIGBUS here without the guard
view[:4] = b"abcd"
assert data == bytes(16), data
try:
    mem.check_backing()
except FrontendError as e:
    print("reported:", e.rule)
view.release()
mem.close()
ram.close()
print("survived")
"""


def test_item9_access_to_truncated_guest_ram_is_survived_and_reported():
    """The check at each kick is racy against a truncating front-end; the access that loses
    the race must not kill the process (SIGBUS): it reads zeros and is reported."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _RACE], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert "reported: mem-region-truncated" in p.stdout and "survived" in p.stdout


def test_item9_sigbus_outside_guest_ram_still_kills():
    """The guard takes only faults inside guest mappings; any other SIGBUS is as before."""
    import subprocess
    import sys
    code = ("import mmap, os\n"
            "from vballoon.sim import GuestRam\n"
            "from vballoon.virtio.memory import GuestMemory\n"
            "ram = GuestRam(1 << 20)\n"
            "mem = GuestMemory.map(ram.regions, [os.dup(ram.fd)])\n"
            "fd = os.memfd_create('other')\n"
            "os.ftruncate(fd, 1 << 16)\n"
            "m = mmap.mmap(fd, 1 << 16)\n"
            "os.ftruncate(fd, 0)\n"
            "m[100]\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert p.returncode == -7                  # SIGBUS, as without the guard
