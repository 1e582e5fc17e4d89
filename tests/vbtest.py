"""Helpers shared by the test files (``from vbtest import ...``; a unique module name, so that
no other directory's conftest.py can shadow it)."""
from __future__ import annotations

import os

from vballoon.loopback import GuestRam
from vballoon.memory import GuestMemory


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def mapped(ram: GuestRam) -> GuestMemory:
    """The daemon's view of ``ram``, as SET_MEM_TABLE would build it."""
    return GuestMemory.map(ram.regions, [os.dup(ram.fd) for _ in ram.regions])
