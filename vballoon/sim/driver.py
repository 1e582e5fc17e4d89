"""The guest side: RAM in a memfd, and split virtqueues as a driver builds them (VIRTIO 1.2 §2.7).

This is test and demo code playing the guest.  It trusts itself, so it has no defences; it
does have ways to write hostile rings (:meth:`DriverQueue.write_desc`, :meth:`DriverQueue.publish`)
for the bad-input tests.
"""
from __future__ import annotations

import asyncio
import mmap
import os
from dataclasses import dataclass
from typing import NamedTuple

from vballoon.wire import C, DESC, LE16, USED_ELEM

# The split ring's layout, from the spec (VIRTIO 1.2 §2.7.2), not from the device's code: a
# descriptor is 16 bytes; avail is {le16 flags, le16 idx, le16 ring[num], le16 used_event};
# used is {le16 flags, le16 idx, {le32 id, le32 len} ring[num], le16 avail_event}.
DESC_SIZE = 16
AVAIL_RING = 4
USED_RING = 4


def avail_size(num: int) -> int:
    return AVAIL_RING + 2 * num + 2


def used_size(num: int) -> int:
    return USED_RING + 8 * num + 2

UVA_BASE = 0x7F12_3400_0000     # where "the front-end" pretends to have mapped guest RAM


def wake(fut: "asyncio.Future[None]") -> None:
    """Resolve ``fut`` unless it is already done (a reader or writer callback)."""
    if not fut.done():
        fut.set_result(None)


class Region(NamedTuple):
    """One entry of the memory table the front-end sends (VhostUserMemoryRegion)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


class GuestRam:
    """Guest RAM: one memfd holding every region back to back, as QEMU's single RAMBlock does.

    ``layout`` is a list of (guest_phys_addr, size); region i starts in the fd at the sum of
    the sizes before it (its ``mmap_offset``) and at ``UVA_BASE`` + that offset in the
    front-end's pretend address space, so gpa, uva and fd offset all differ, as they do in QEMU.
    A bump allocator hands out driver memory (rings, buffers) from the start of region 0.
    """

    def __init__(self, layout: list[tuple[int, int]] | int, *, name: str = "guest-ram") -> None:
        if isinstance(layout, int):
            layout = [(0, layout)]
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        total = sum(size for _, size in layout)
        os.ftruncate(self.fd, total)
        self.mm = mmap.mmap(self.fd, total, flags=mmap.MAP_SHARED)
        self.view = memoryview(self.mm)
        self.regions: list[Region] = []
        off = 0
        for gpa, size in layout:
            self.regions.append(Region(gpa, size, UVA_BASE + off, off))
            off += size
        self.size = total
        self._next = self.regions[0].guest_phys_addr + 0x1000   # keep page 0 unused
        self.driver_limit = self.regions[0].guest_phys_addr + self.regions[0].memory_size

    def _off(self, gpa: int, length: int) -> int:
        for r in self.regions:
            if r.guest_phys_addr <= gpa and gpa + length <= r.guest_phys_addr + r.memory_size:
                return r.mmap_offset + gpa - r.guest_phys_addr
        raise ValueError(f"gpa {gpa:#x}+{length:#x} is not in guest RAM")

    def at(self, gpa: int, length: int) -> memoryview:
        o = self._off(gpa, length)
        return self.view[o:o + length]

    def uva(self, gpa: int) -> int:
        return UVA_BASE + self._off(gpa, 0)

    def reserve_driver_memory(self, start: int, size: int) -> None:
        """Driver allocations come from ``[start, start + size)`` from now on (the rest of RAM
        is the guest's to balloon)."""
        self._next = max(self._next, start)
        self.driver_limit = start + size

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = -(-self._next // align) * align
        if gpa + size > self.driver_limit:
            raise MemoryError("guest driver memory exhausted")
        self._next = gpa + size
        return gpa

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the memfd backed by host memory now (what reclaim makes smaller)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        self.view.release()
        self.mm.close()
        os.close(self.fd)


@dataclass
class Used:
    head: int
    len: int


class DriverQueue:
    """One split virtqueue, driver side, in :class:`GuestRam`."""

    def __init__(self, ram: GuestRam, index: int, num: int = 64, *, event_idx: bool = False,
                 indirect: bool = False) -> None:
        self.ram, self.index, self.num = ram, index, num
        self.event_idx, self.indirect = event_idx, indirect
        self.desc = ram.alloc(DESC_SIZE * num, 16)
        self.avail = ram.alloc(avail_size(num), 2)
        self.used = ram.alloc(used_size(num), 4)
        self.free = list(range(num))
        self.avail_idx = 0
        self.last_used = 0
        self._ids_of: dict[int, list[int]] = {}     # head -> descriptors of its chain
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # -- building chains --------------------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                   table: int | None = None) -> None:
        """Write descriptor ``i`` of the ring's table (or of an indirect table at ``table``)."""
        base = self.desc if table is None else table
        DESC.pack_into(self.ram.at(base + DESC_SIZE * i, DESC_SIZE), 0, addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        """Put ``head`` in the avail ring and move avail idx (the element first, then idx)."""
        LE16.pack_into(self.ram.at(self.avail + AVAIL_RING + 2 * (self.avail_idx % self.num), 2),
                       0, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        LE16.pack_into(self.ram.at(self.avail + 2, 2), 0, self.avail_idx)

    def add(self, buffers: list[tuple[int, int, bool]], *, indirect: bool = False) -> int:
        """Make a chain of (gpa, len, device_writable) available; returns its head."""
        if indirect:
            table = self.ram.alloc(DESC_SIZE * len(buffers), 16)
            for i, (addr, length, write) in enumerate(buffers):
                last = i == len(buffers) - 1
                flags = (C.VRING_DESC_F_WRITE if write else 0) | (0 if last else C.VRING_DESC_F_NEXT)
                self.write_desc(i, addr, length, flags, 0 if last else i + 1, table=table)
            head = self.free.pop(0)
            self.write_desc(head, table, DESC_SIZE * len(buffers), C.VRING_DESC_F_INDIRECT)
            self._ids_of[head] = [head]
        else:
            if len(buffers) > len(self.free):
                raise RuntimeError(f"queue {self.index}: no free descriptors")
            ids = [self.free.pop(0) for _ in buffers]
            for k, (i, (addr, length, write)) in enumerate(zip(ids, buffers)):
                last = k == len(ids) - 1
                flags = (C.VRING_DESC_F_WRITE if write else 0) | (0 if last else C.VRING_DESC_F_NEXT)
                self.write_desc(i, addr, length, flags, 0 if last else ids[k + 1])
            head = ids[0]
            self._ids_of[head] = ids
        self.publish(head)
        return head

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    # -- reaping -------------------------------------------------------------------------

    def used_idx(self) -> int:
        return LE16.unpack_from(self.ram.at(self.used + 2, 2))[0]

    def reap(self) -> list[Used]:
        """Used elements published since the last call; their descriptors are free again."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + USED_RING + USED_ELEM.size * (self.last_used % self.num)
            head, length = USED_ELEM.unpack_from(self.ram.at(slot, USED_ELEM.size))
            out.append(Used(head, length))
            self.free.extend(self._ids_of.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:   # interrupt me at the next used element
            LE16.pack_into(self.ram.at(self.avail + AVAIL_RING + 2 * self.num, 2), 0,
                           self.last_used)
        return out

    async def wait_used(self, n: int = 1, timeout: float = 5.0) -> list[Used]:
        """Wait (on the call eventfd) until ``n`` more chains are used; returns them."""
        loop = asyncio.get_running_loop()
        got = self.reap()
        deadline = loop.time() + timeout
        while len(got) < n:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"queue {self.index}: {len(got)} of {n} chains used")
            fut = loop.create_future()
            loop.add_reader(self.call_fd, wake, fut)
            try:
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:
                pass
            finally:
                loop.remove_reader(self.call_fd)
            try:
                os.eventfd_read(self.call_fd)
            except BlockingIOError:
                pass
            got += self.reap()
        return got

    def interrupted(self) -> bool:
        """Consume a pending interrupt, if any."""
        try:
            os.eventfd_read(self.call_fd)
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.kick_fd)
        os.close(self.call_fd)
