"""Guest memory: the regions of a vhost-user memory table, mapped, with ONE checked access path.

The guest is untrusted, and so is the front-end's table.  Every read or write of guest memory goes
through :meth:`GuestMemory.gpa_view` (guest-physical addresses, found in descriptors) or
:meth:`GuestMemory.uva_view` (front-end virtual addresses, found in SET_VRING_ADDR), which check
the whole ``[addr, addr+len)`` range against one region and return a :class:`memoryview` of
exactly that range.  A range that crosses a region boundary is refused even if the regions are
adjacent: Linux never builds such buffers for the balloon, and refusing keeps one view = one
mapping.

Regions must be host-page-aligned (a discard is whole host pages; see protocol/vhost-user.md,
"Guest memory"), and a region's file may not shrink under it: :meth:`GuestMemory.check_backing`
says when it did, and an access that races the truncation is survived (a SIGBUS guard in
``_vring`` maps a zero page over the faulting page and counts the fault).

A :class:`GuestMemory` is an immutable snapshot; SET_MEM_TABLE builds a new one and the session
re-translates its rings before closing the old one (vhost-user.rst, "Memory access"; rust-vmm's
GuestMemoryAtomic works the same way).
"""
from __future__ import annotations

import bisect
import fcntl
import logging
import mmap
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from vballoon.virtio._vring import ffi as _ffi, lib as _lib
from vballoon.errors import FrontendError, GuestMemoryError

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class RegionSpec:
    """One entry of a memory table (struct vhost_user_memory_region)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(eq=False)
class Region:
    spec: RegionSpec
    fd: int
    mm: mmap.mmap
    base: int                     # offset of the region's first byte inside ``mm``
    view: memoryview = field(repr=False)
    sealed: bool = False          # the file cannot shrink (F_SEAL_SHRINK): no size checks

    @property
    def gpa(self) -> int:
        return self.spec.guest_phys_addr

    @property
    def size(self) -> int:
        return self.spec.memory_size

    @property
    def uva(self) -> int:
        return self.spec.userspace_addr


def _map_alignment(fd: int) -> int:
    # hugetlbfs refuses mmap offsets that are not huge-page aligned; its f_bsize is the huge
    # page size.  tmpfs/memfd and ordinary files report the base page size or less.
    try:
        bsize = os.statvfs(f"/proc/self/fd/{fd}").f_bsize
    except OSError:
        bsize = PAGE_SIZE
    return max(PAGE_SIZE, bsize)


def validate_table(specs: Sequence[RegionSpec]) -> None:
    """Syntax and consistency of a memory table, before anything is mapped."""
    for i, s in enumerate(specs):
        if s.memory_size == 0:
            raise FrontendError("mem-region-empty", f"region {i} has memory_size 0")
        for name in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
            # A discard works on whole host pages of the file: a region that is not
            # page-aligned would let one guest page's discard zero part of its neighbour.
            if getattr(s, name) % PAGE_SIZE:
                raise FrontendError("mem-region-unaligned",
                                    f"region {i}: {name} {getattr(s, name):#x} is not a "
                                    f"multiple of the host page size ({PAGE_SIZE:#x})")
        for name, start in (("guest_phys_addr", s.guest_phys_addr),
                            ("userspace_addr", s.userspace_addr),
                            ("mmap_offset", s.mmap_offset)):
            if start + s.memory_size - 1 > U64_MAX:
                raise FrontendError("mem-region-overflow",
                                    f"region {i}: {name} {start:#x} + size {s.memory_size:#x} "
                                    "overflows 64 bits")
    for key, what in ((lambda s: s.guest_phys_addr, "guest-physical"),
                      (lambda s: s.userspace_addr, "front-end virtual")):
        ordered = sorted(specs, key=key)
        for a, b in zip(ordered, ordered[1:]):
            if key(a) + a.memory_size > key(b):
                raise FrontendError("mem-region-overlap",
                                    f"regions overlap in {what} addresses at {key(b):#x}")


class GuestMemory:
    """The mapped memory table.  Owns the region fds and mappings until :meth:`close`."""

    def __init__(self, regions: Sequence[Region] = ()) -> None:
        self.regions = sorted(regions, key=lambda r: r.gpa)
        self._by_uva = sorted(self.regions, key=lambda r: r.uva)
        # per address space: sorted starts, and ends, for the lookup (hot: once per descriptor)
        self._gpa = ([r.gpa for r in self.regions], [r.gpa + r.size for r in self.regions])
        self._uva = ([r.uva for r in self._by_uva], [r.uva + r.size for r in self._by_uva])
        # the same table for the C chain walk (vballoon._vring): starts, ends, host pointers
        self._host = [_ffi.from_buffer("uint8_t[]", r.view, require_writable=True)
                      for r in self.regions]
        # a SIGBUS in these mappings (their file truncated) is survived and counted
        if _lib.vq_guard_install() == 0:
            self._guarded = [h for h, r in zip(self._host, self.regions)
                             if _lib.vq_guard_add(h, len(r.view)) == 0]
        else:
            self._guarded = []
        self.c_table = (len(self.regions), _ffi.new("uint64_t[]", self._gpa[0]),
                        _ffi.new("uint64_t[]", self._gpa[1]),
                        _ffi.new("uint8_t *[]", [h + r.base for h, r in
                                                 zip(self._host, self.regions)]))

    @classmethod
    def map(cls, specs: Sequence[RegionSpec], fds: Sequence[int]) -> "GuestMemory":
        """Validate and map a table.  Takes ownership of ``fds`` (closed on failure too)."""
        regions: list[Region] = []
        try:
            if len(specs) != len(fds):
                raise FrontendError("mem-table-fd-count",
                                    f"{len(specs)} regions but {len(fds)} fds")
            validate_table(specs)
            for i, (s, fd) in enumerate(zip(specs, fds)):
                regions.append(_map_region(i, s, fd))
        except BaseException:
            for r in regions:
                _unmap(r)
            for fd in fds[len(regions):]:
                os.close(fd)
            raise
        return cls(regions)

    def close(self) -> None:
        self.c_table = (0, _ffi.NULL, _ffi.NULL, _ffi.NULL)
        for h in self._guarded:
            _lib.vq_guard_remove(h)
        self._guarded = []
        for h in self._host:
            _ffi.release(h)
        self._host = []
        for r in self.regions:
            _unmap(r)
        self.regions, self._by_uva = [], []
        self._gpa = self._uva = ([], [])

    # -- the one checked access path ------------------------------------------------------

    @staticmethod
    def _lookup(space: tuple[list[int], list[int]], addr: int, length: int, kind: str) -> int:
        """Index of the region holding all of ``[addr, addr+length)``, or GuestMemoryError.

        Region ends are below 2^64 (validate_table), so ``addr + length <= end`` also rules
        out ranges that overflow 64 bits."""
        starts, ends = space
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and length >= 0 and addr + length <= ends[i]:
            return i
        raise GuestMemoryError("addr-outside-memory",
                               f"{kind} range {addr:#x}+{length:#x} is not inside one region")

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest-physical ``[gpa, gpa+length)``, or GuestMemoryError."""
        r = self.regions[self._lookup(self._gpa, gpa, length, "guest-physical")]
        o = r.base + gpa - r.gpa
        return r.view[o:o + length]

    def uva_view(self, uva: int, length: int) -> memoryview:
        """A writable view of front-end virtual ``[uva, uva+length)``, or GuestMemoryError."""
        r = self._by_uva[self._lookup(self._uva, uva, length, "front-end virtual")]
        o = r.base + uva - r.uva
        return r.view[o:o + length]

    def check_backing(self) -> None:
        """FrontendError ``mem-region-truncated`` if a region's file has shrunk below the
        mapping since it was mapped (touching such a page would raise SIGBUS and kill the
        process).  Free for files sealed against shrinking (QEMU's memory-backend-memfd is, by
        default); one fstat per unsealed region otherwise.  Racy against a front-end that
        truncates between this check and the access; that access is survived (a SIGBUS handler
        maps a zero page there) and reported here at the next check.  See protocol/vhost-user.md.
        """
        for h in self._guarded:
            if _lib.vq_guard_faults(h):
                raise FrontendError("mem-region-truncated", "guest RAM was truncated under a "
                                    "mapping (an access faulted with SIGBUS)")
        for r in self.regions:
            if r.sealed:
                continue
            try:
                size = os.fstat(r.fd).st_size
            except OSError as e:
                raise FrontendError("mem-region-truncated", f"region at gpa {r.gpa:#x}: "
                                    f"fstat failed: {e}") from None
            if size < r.spec.mmap_offset + r.size:
                raise FrontendError("mem-region-truncated",
                                    f"region at gpa {r.gpa:#x}: its file shrank to {size:#x} "
                                    f"bytes, below mmap_offset + size "
                                    f"{r.spec.mmap_offset + r.size:#x}")

    def check_gpa(self, gpa: int, length: int) -> None:
        self._lookup(self._gpa, gpa, length, "guest-physical")

    @property
    def ram_ranges(self) -> list[tuple[int, int]]:
        """(guest_phys_addr, size) of every region, sorted: the guest's RAM with its holes."""
        return [(r.gpa, r.size) for r in self.regions]

    # -- host memory reclaim ---------------------------------------------------------------

    def discard(self, starts: "np.ndarray", lengths: "np.ndarray") -> tuple[int, int]:
        """Give guest-physical ranges back to the host: one MADV_REMOVE per range and region.

        On a shared memfd/tmpfs/hugetlbfs mapping MADV_REMOVE punches a hole in the file, as
        ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` at the fd offset would; the pages read back as zero.
        Ranges are clipped to the regions (parts in holes are skipped), then to the whole host
        pages inside them: a byte outside a range is never discarded, whatever its alignment.
        Returns (calls issued, bytes discarded).
        """
        starts = np.asarray(starts, dtype=np.uint64)
        ends = starts + np.asarray(lengths, dtype=np.uint64)
        page = np.uint64(PAGE_SIZE)
        calls = done = 0
        err = _ffi.new("int *")
        for r, host in zip(self.regions, self._host):
            lo = np.maximum(starts, np.uint64(r.gpa))
            hi = np.minimum(ends, np.uint64(r.gpa + r.size))
            keep = lo < hi
            # offsets in the mapping (which starts page-aligned in the file), rounded inwards
            lo_off = lo[keep] - np.uint64(r.gpa) + np.uint64(r.base)
            hi_off = hi[keep] - np.uint64(r.gpa) + np.uint64(r.base)
            lo_off = (lo_off + page - np.uint64(1)) // page * page
            hi_off = hi_off // page * page
            whole = lo_off < hi_off
            offs = np.ascontiguousarray(lo_off[whole])
            lens = np.ascontiguousarray(hi_off[whole] - lo_off[whole])
            n = _lib.vq_discard(host, _ffi.from_buffer("uint64_t[]", offs),
                                _ffi.from_buffer("uint64_t[]", lens), offs.size, err)
            calls += n
            done += int(lens[:n].sum())
            if n < offs.size:
                raise OSError(err[0], f"MADV_REMOVE at gpa {r.gpa + int(offs[n]) - r.base:#x}: "
                              f"{os.strerror(err[0])}")
        return calls, done


def _map_region(i: int, s: RegionSpec, fd: int) -> Region:
    """Map one region; on failure the caller still owns (and closes) ``fd``."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise FrontendError("mem-region-bad-fd", f"region {i}: fstat failed: {e}") from None
    if s.mmap_offset + s.memory_size > st.st_size:
        raise FrontendError("mem-region-past-fd",
                            f"region {i}: mmap_offset {s.mmap_offset:#x} + size "
                            f"{s.memory_size:#x} is past the end of its fd ({st.st_size:#x})")
    align = _map_alignment(fd)
    start = s.mmap_offset - s.mmap_offset % align
    base = s.mmap_offset - start
    try:
        mm = mmap.mmap(fd, base + s.memory_size, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError, OverflowError) as e:
        raise FrontendError("mem-region-mmap", f"region {i}: mmap failed: {e}") from None
    log.debug("mapped region %d: gpa %#x size %#x uva %#x fd-offset %#x", i,
              s.guest_phys_addr, s.memory_size, s.userspace_addr, s.mmap_offset)
    return Region(s, fd, mm, base, memoryview(mm), _sealed_against_shrink(fd))


def _sealed_against_shrink(fd: int) -> bool:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:          # not a memfd (a tmpfs or hugetlbfs file): it can shrink
        return False


def _unmap(r: Region) -> None:
    try:
        r.view.release()
        r.mm.close()
    except BufferError:
        # A view is still alive somewhere (e.g. in a traceback); the mapping goes when it does.
        log.debug("region at gpa %#x still has views; unmapped when they are freed", r.gpa)
    finally:
        os.close(r.fd)
