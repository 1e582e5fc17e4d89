"""Wire layouts, loaded once from the C declarations in ``protocol/`` through cffi.

``protocol/*.h`` is the single source of every struct the daemon reads or writes.  cffi parses
the declarations and lays the structs out; :class:`Layout` turns each layout into a precompiled
:class:`struct.Struct` of the right byte order, which is how the hot paths read guest memory and
messages (one C call per struct, no per-field cdata access).  Tests pin every size and offset to
the specifications' numbers.

vhost-user messages are in the host's byte order; rings, config space and the bitmap queue are
little-endian.  The host must be little-endian (x86-64, arm64 LE): the daemon refuses to start on
anything else rather than misread guest memory.
"""
from __future__ import annotations

import struct
import sys
from importlib import resources
from types import SimpleNamespace
from typing import Any, NamedTuple

import cffi

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("vballoon supports little-endian hosts only")

# header file -> (byte order of its structs, packed?)
HEADERS = {
    "vhost_user.h": ("=", False),
    "virtio_ring.h": ("<", False),
    "virtio_balloon.h": ("<", True),
    "bitmap_queue.h": ("<", False),
    "export_format.h": ("<", False),
}

_CODES = {("uint", 1): "B", ("uint", 2): "H", ("uint", 4): "I", ("uint", 8): "Q",
          ("int", 1): "b", ("int", 2): "h", ("int", 4): "i", ("int", 8): "q"}


def header_text(name: str) -> str:
    return resources.files("vballoon.protocol").joinpath(name).read_text()


def _load() -> tuple[cffi.FFI, dict[str, str], SimpleNamespace]:
    ffi = cffi.FFI()
    order_of: dict[str, str] = {}
    consts: dict[str, int] = {}
    for name, (order, packed) in HEADERS.items():
        text = header_text(name)
        before = set(_struct_names(ffi))
        ffi.cdef(text, packed=packed)
        for tag in set(_struct_names(ffi)) - before:
            order_of[tag] = order
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "#define":
                consts[parts[1]] = int(parts[2], 0)
    return ffi, order_of, SimpleNamespace(**consts)


def _struct_names(ffi: cffi.FFI) -> list[str]:
    return [n for n in ffi.list_types()[1]]


ffi, _ORDER, C = _load()
"""``ffi``: the cffi instance holding every layout; ``C``: every ``#define`` as an attribute."""


class Layout:
    """A struct of ``protocol/*.h`` as a fast codec: ``unpack_from`` returns a named tuple.

    Flexible array members (``ring[]``) are left out of the codec; their offset is
    :attr:`offsets`\\ ``[name]``.
    """

    def __init__(self, tag: str) -> None:
        ctype = ffi.typeof(f"struct {tag}")
        self.tag = tag
        self.size: int = ffi.sizeof(ctype)
        self.offsets: dict[str, int] = {}
        fmt, pos, names = _ORDER[tag], 0, []
        for fname, field in ctype.fields:
            self.offsets[fname] = field.offset
            if field.type.kind == "array" and field.type.length is None:
                continue
            if field.type.kind != "primitive":
                raise TypeError(f"{tag}.{fname}: only integer fields are supported")
            kind = "int" if field.type.cname.startswith("int") else "uint"
            fmt += "x" * (field.offset - pos) + _CODES[(kind, ffi.sizeof(field.type))]
            pos = field.offset + ffi.sizeof(field.type)
            names.append(fname)
        self.fixed_size = pos
        fmt += "x" * (self.size - pos) if names and len(names) == len(ctype.fields) else ""
        self.struct = struct.Struct(fmt)
        self.tuple: Any = NamedTuple(tag, [(n, int) for n in names])  # type: ignore[misc]

    def unpack_from(self, buf: Any, offset: int = 0) -> Any:
        return self.tuple._make(self.struct.unpack_from(buf, offset))

    def unpack(self, buf: Any) -> Any:
        return self.tuple._make(self.struct.unpack(buf))

    def pack(self, *args: int, **kw: int) -> bytes:
        return self.struct.pack(*self.tuple(*args, **kw))

    def pack_into(self, buf: Any, offset: int, *args: int) -> None:
        self.struct.pack_into(buf, offset, *args)


HEADER = Layout("vhost_user_header")
VRING_STATE = Layout("vhost_vring_state")
VRING_ADDR = Layout("vhost_vring_addr")
MEM_REGION = Layout("vhost_user_memory_region")
MEMORY = Layout("vhost_user_memory")
CONFIG = Layout("vhost_user_config")
DESC = Layout("vring_desc")
AVAIL = Layout("vring_avail")
USED_ELEM = Layout("vring_used_elem")
USED = Layout("vring_used")
BALLOON_CONFIG = Layout("virtio_balloon_config")
BALLOON_STAT = Layout("virtio_balloon_stat")
U64 = struct.Struct("=Q")
LE16 = struct.Struct("<H")
LE32 = struct.Struct("<I")
