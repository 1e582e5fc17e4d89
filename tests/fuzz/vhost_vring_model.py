"""A reference model of the split-virtqueue chain walk, written from VIRTIO 1.2 §2.7.5 (and the
rules vballoon adds: one region per buffer, a chain no longer than the queue, 2^32 bytes at most),
for differential fuzzing of the C walk (``vballoon.virtio._vring.vq_walk``).

Deliberately imports nothing from vballoon: it must be able to disagree with the code.
Also importable by the AddressSanitizer driver, which runs in a subprocess.
"""
from __future__ import annotations

import struct

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
ERR = {"HEAD": -1, "LOOP": -2, "NEXT": -3, "INDIRECT_FEATURE": -4, "INDIRECT_NESTED": -5,
       "INDIRECT_NEXT": -6, "INDIRECT_LENGTH": -7, "INDIRECT_ALONE": -8,
       "READ_AFTER_WRITE": -9, "TOO_LONG": -10, "OUTSIDE": -11}
_DESC = struct.Struct("<QIHH")


def find(regions, addr, length):
    """Index of the region (start, bytes) holding all of [addr, addr+length), or -1."""
    for i, (start, data) in enumerate(regions):
        end = start + len(data)
        if start <= addr < end and length <= end - addr:
            return i
    return -1


def walk(table: bytes, num: int, head: int, indirect_ok: bool, regions):
    """(error code, None) or (0, (buffers, first_writable)); a buffer is
    (addr, len, region, offset in region); first_writable is None without one."""
    t, size, i = table, num, head
    seen = count = total = 0
    indirect = wrote = False
    out, first_w = [], None
    if head >= num:
        return ERR["HEAD"], None
    while True:
        seen += 1
        if seen > size:
            return ERR["LOOP"], None
        addr, length, flags, nxt = _DESC.unpack_from(t, 16 * i)
        if flags & F_INDIRECT:
            if not indirect_ok:
                return ERR["INDIRECT_FEATURE"], None
            if indirect:
                return ERR["INDIRECT_NESTED"], None
            if flags & F_NEXT:
                return ERR["INDIRECT_NEXT"], None
            if seen != 1:
                return ERR["INDIRECT_ALONE"], None
            if length == 0 or length % 16 or length // 16 > num:
                return ERR["INDIRECT_LENGTH"], None
            r = find(regions, addr, length)
            if r < 0:
                return ERR["OUTSIDE"], None
            start, data = regions[r]
            t = bytes(data[addr - start:addr - start + length])
            size, i, seen, indirect = length // 16, 0, 0, True
            continue
        w = bool(flags & F_WRITE)
        if not w and wrote:
            return ERR["READ_AFTER_WRITE"], None
        if w and not wrote:
            first_w = count
        wrote |= w
        total += length
        if total > 1 << 32:
            return ERR["TOO_LONG"], None
        r = find(regions, addr, length)
        if r < 0:
            return ERR["OUTSIDE"], None
        out.append((addr, length, r, addr - regions[r][0]))
        count += 1
        if not flags & F_NEXT:
            return 0, (out, first_w)
        if nxt >= size:
            return ERR["NEXT"], None
        i = nxt


def run_c(ffi, lib, table: bytes, num: int, head: int, indirect_ok: bool, regions):
    """The same walk through a compiled ``vq_walk`` (normal or sanitized build), with every
    buffer an exact-size heap allocation so that an over-read is an ASan report."""
    tbl = ffi.new("uint8_t[]", table)                 # exactly num * 16 bytes
    hosts = [ffi.new("uint8_t[]", bytes(data)) for _, data in regions]
    n = len(regions)
    rstart = ffi.new("uint64_t[]", [s for s, _ in regions] or [0])
    rend = ffi.new("uint64_t[]", [s + len(d) for s, d in regions] or [0])
    rhost = ffi.new("uint8_t *[]", hosts or [ffi.NULL])
    addr, length = ffi.new("uint64_t[]", num), ffi.new("size_t[]", num)
    host, info = ffi.new("uint8_t *[]", num), ffi.new("uint64_t[3]")
    got = lib.vq_walk(tbl, num, head, int(indirect_ok), n, rstart, rend, rhost, addr, length,
                      host, info)
    if got < 0:
        return got, None
    bufs = []
    for k in range(got):
        r = find(regions, addr[k], length[k])
        assert r >= 0, "the C walk returned a buffer outside memory"
        off = int(ffi.cast("uintptr_t", host[k])) - int(ffi.cast("uintptr_t", hosts[r]))
        bufs.append((addr[k], length[k], r, off))
    first_w = None if info[2] == 2**64 - 1 else int(info[2])
    return 0, (bufs, first_w)
