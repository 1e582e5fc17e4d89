"""Free-page map export files: writing them safely, reading them back.

The formats are specified in ``protocol/export-format.md``; the binary header is
``protocol/export_format.h`` (loaded through :mod:`vballoon.wire`).  Three formats:

- ``ranges``: the header, the RAM extents, then the free ranges as little-endian u64 pairs
  ``(start_pfn, npages)``, ascending and maximal.  The format for migration engines.
- ``bitmap``: the header, the RAM extents, then three bitmaps over ``[0, max_pfn)``: free,
  covered, ballooned.  Bit *k* of a bitmap is bit ``k % 64`` of little-endian word ``k // 64``.
- ``json``: the same facts as one JSON object, for small maps and for people.

Files are only ever written inside the daemon's export directory, under a name the client
gives: a relative path whose components are all plain names, none of them a symlink (each
directory is opened with ``O_NOFOLLOW`` relative to its parent, ``openat``-style).  A file
appears complete or not at all: it is written to a temporary name in the same directory,
fsync'ed, renamed over the target (``rename`` replaces a symlink, never follows it), and the
directory is fsync'ed.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from dataclasses import dataclass
from typing import IO, Any, Iterator

import numpy as np

from vballoon.errors import ConfigError
from vballoon.fpmap.map import MAX_PFNS, PAGE_SHIFT, FreePageMap
from vballoon.wire import C, Layout

HEADER = Layout("vballoon_export_header")
EXTENT = Layout("vballoon_export_extent")
RANGE_SIZE = Layout("vballoon_export_range").size
MAGIC = C.VBALLOON_EXPORT_MAGIC.to_bytes(8, "little")          # b"VBFPMAP\n"
VERSION = C.VBALLOON_EXPORT_VERSION
FORMATS = ("ranges", "bitmap", "json")
JSON_FORMAT_NAME = "vballoon-free-page-map"
KINDS = {"bitmap": C.VBALLOON_EXPORT_KIND_BITMAP, "hint": C.VBALLOON_EXPORT_KIND_HINT}
STATES = {"requested": C.VBALLOON_EXPORT_STATE_REQUESTED,
          "receiving": C.VBALLOON_EXPORT_STATE_RECEIVING,
          "done": C.VBALLOON_EXPORT_STATE_DONE, "aborted": C.VBALLOON_EXPORT_STATE_ABORTED}
PAYLOADS = {"ranges": C.VBALLOON_EXPORT_PAYLOAD_RANGES, "bitmap": C.VBALLOON_EXPORT_PAYLOAD_BITMAP}
MAX_NAME = 200          # bytes of the file name: room for the temporary name's affixes
BATCH = 1 << 16         # ranges per write


class ExportFormatError(ConfigError):
    """A file that is not a valid export (``read_export``)."""


@dataclass(frozen=True)
class ExportResult:
    """What ``export-free-page-map`` answers: where the file is, its size, its free ranges."""

    path: str
    bytes: int
    ranges: int
    format: str


# -- where a file may go ------------------------------------------------------------------------

def _refuse(message: str) -> ConfigError:
    return ConfigError("export-path", message)


def open_target(export_dir: str, filename: str) -> tuple[int, str]:
    """The directory fd and leaf name ``filename`` names inside ``export_dir``.

    ``filename`` is relative, its components plain names (not empty, ``.`` or ``..``); its
    directories exist and none is a symlink; the leaf, if it exists, is a regular file.  The
    export directory itself is configuration and may be reached through a symlink.  The caller
    closes the fd.

    :raise ConfigError: ``export-path``, saying which rule the name broke.
    """
    if not isinstance(filename, str) or not filename:
        raise _refuse("the file name is empty")
    if "\0" in filename:
        raise _refuse("the file name contains a NUL byte")
    try:
        filename.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse("the file name is not valid Unicode (a lone surrogate)") from None
    if filename.startswith("/"):
        raise _refuse(f"{filename!r} is absolute: name a file inside the export directory")
    parts = filename.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise _refuse(f"{filename!r}: '..', '.' and empty path components are refused")
    if len(parts[-1].encode()) > MAX_NAME:
        raise _refuse(f"the file name is longer than {MAX_NAME} bytes")
    try:
        dir_fd = os.open(export_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise _refuse(f"cannot open the export directory {export_dir}: {e.strerror}") from None
    try:
        for i, part in enumerate(parts[:-1]):
            where = "/".join(parts[:i + 1])
            try:
                fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=dir_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse(f"{where!r} is a symlink or not a directory") from None
                raise _refuse(f"{where!r}: {e.strerror}") from None
            os.close(dir_fd)
            dir_fd = fd
        leaf = parts[-1]
        try:
            st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISLNK(st.st_mode):
                raise _refuse(f"{filename!r} is a symlink")
            if not stat.S_ISREG(st.st_mode):
                raise _refuse(f"{filename!r} exists and is not a regular file")
        return dir_fd, leaf
    except BaseException:
        os.close(dir_fd)
        raise


def write_atomically(export_dir: str, filename: str, write: Any) -> tuple[str, int]:
    """Create ``filename`` in ``export_dir`` (rules of :func:`open_target`) with the bytes
    ``write(file)`` writes: temporary file, fsync, rename, fsync of the directory.  Mode 0600.

    Returns (absolute path, size).  :raise ConfigError: ``export-path``, ``export-io``.
    """
    dir_fd, leaf = open_target(export_dir, filename)
    tmp = f".{leaf}.{secrets.token_hex(6)}.tmp"
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dir_fd)
        except OSError as e:
            raise ConfigError("export-io", f"cannot create a file in {export_dir}: "
                              f"{e.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.rename(tmp, leaf, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as e:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise ConfigError("export-io", f"writing {filename!r}: {e.strerror}") from None
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return os.path.join(os.path.abspath(export_dir), filename), size


# -- writing ------------------------------------------------------------------------------------

def _usec(t: float | None) -> int:
    return 0 if t is None else max(0, int(round(t * 1_000_000)))


def _ranges(m: FreePageMap) -> Iterator[np.ndarray]:
    """The free ranges in batches, as little-endian u64 pairs."""
    for batch in m.iter_ranges(batch=BATCH):
        yield batch.astype("<u8", copy=False)


def _bitmap_words(bits: np.ndarray | None, nwords: int) -> np.ndarray:
    """A uint8 bitmap (bit p = byte p >> 3, bit p & 7) as ``nwords`` little-endian u64 words."""
    out = np.zeros(nwords * 8, dtype=np.uint8)
    if bits is not None:
        src = np.asarray(bits, dtype=np.uint8).ravel()[:out.size]
        out[:src.size] = src
    return out.view("<u8")


def _header(rnd: Any, fmt: str, nr_ranges: int) -> bytes:
    m: FreePageMap = rnd.map
    state = rnd.state.value
    return HEADER.pack(
        magic=C.VBALLOON_EXPORT_MAGIC, version=VERSION, page_shift=PAGE_SHIFT,
        payload=PAYLOADS[fmt], round_id=rnd.id, kind=KINDS[rnd.kind],
        state=STATES[state], flags=C.VBALLOON_EXPORT_F_COMPLETE if rnd.complete else 0,
        nr_extents=len(m.ram), max_pfn=m.max_pfn, ram_pages=m.ram_pages,
        covered_pages=m.covered_pages(), free_pages=m.free_pages(), nr_ranges=nr_ranges,
        requested_at_us=_usec(rnd.requested_at), finished_at_us=_usec(rnd.finished_at))


def _write_binary(f: IO[bytes], rnd: Any, fmt: str, ballooned: np.ndarray | None) -> int:
    m: FreePageMap = rnd.map
    f.write(b"\0" * HEADER.size)                        # the header goes last: it holds counts
    for a, b in m.ram:
        f.write(EXTENT.pack(a, b - a))
    n = 0
    if fmt == "ranges":
        for batch in _ranges(m):
            f.write(batch.tobytes())
            n += len(batch)
    else:
        for words in (m.free, m.covered, _bitmap_words(ballooned, m.nwords)):
            f.write(np.ascontiguousarray(words, dtype="<u8").data)
        n = sum(len(batch) for batch in m.iter_ranges(batch=BATCH))
    end = f.tell()
    f.seek(0)
    f.write(_header(rnd, fmt, n))
    f.seek(end)
    return n


def json_summary(rnd: Any) -> dict[str, Any]:
    """Everything but the ranges, as the JSON format has it."""
    m: FreePageMap = rnd.map
    return {
        "format": JSON_FORMAT_NAME, "version": VERSION, "page-size": 1 << PAGE_SHIFT,
        "round": {"id": rnd.id, "kind": rnd.kind, "state": rnd.state.value,
                  "complete": bool(rnd.complete), "requested-at": rnd.requested_at,
                  "finished-at": rnd.finished_at},
        "max-pfn": m.max_pfn, "ram-pages": m.ram_pages, "covered-pages": m.covered_pages(),
        "free-pages": m.free_pages(), "coverage": m.coverage(),
        "ram": [[a, b - a] for a, b in m.ram],
    }


def _write_json(f: IO[bytes], rnd: Any) -> int:
    head = json.dumps(json_summary(rnd), allow_nan=False)
    f.write(head[:-1].encode() + b', "ranges": [')
    n = 0
    for batch in rnd.map.iter_ranges(batch=BATCH):
        text = ", ".join(f"[{a}, {b}]" for a, b in batch.tolist())
        f.write(((", " if n else "") + text).encode())
        n += len(batch)
    f.write(f'], "range-count": {n}}}\n'.encode())
    return n


def write_export(rnd: Any, export_dir: str, filename: str, fmt: str = "ranges", *,
                 ballooned: np.ndarray | None = None) -> ExportResult:
    """Write round ``rnd``'s map (a :class:`~vballoon.fpmap.Round`, of either kind) to
    ``filename`` inside ``export_dir``.

    ``ballooned``: the device's inflated-page bitmap (uint8, bit p = pfn p), for the bitmap
    format's third bitmap; all zero if None.  A running round may be exported: the header says
    its state, and the file holds what was merged so far.

    :raise ConfigError: ``export-format`` (unknown format), ``export-path``, ``export-io``.
    """
    if fmt not in FORMATS:
        raise ConfigError("export-format", f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    count = [0]

    def write(f: IO[bytes]) -> None:
        count[0] = _write_json(f, rnd) if fmt == "json" else _write_binary(f, rnd, fmt, ballooned)

    path, size = write_atomically(export_dir, filename, write)
    return ExportResult(path, size, count[0], fmt)


# -- reading ------------------------------------------------------------------------------------

@dataclass
class ExportedMap:
    """An export file's contents.  ``ram`` are ``(start_pfn, end_pfn)`` extents and ``free``,
    ``covered``, ``ballooned`` uint64 word bitmaps (bitmap format only), as in
    :class:`~vballoon.fpmap.FreePageMap`, so a picture can be drawn from either."""

    format: str
    version: int
    page_size: int
    round_id: int
    kind: str
    state: str
    complete: bool
    requested_at: float
    finished_at: float | None
    max_pfn: int
    ram: tuple[tuple[int, int], ...]
    ram_pages: int
    covered_pages: int
    free_pages: int
    ranges: np.ndarray                     # (n, 2) int64 (start_pfn, npages), ascending
    free: np.ndarray | None = None
    covered: np.ndarray | None = None
    ballooned: np.ndarray | None = None

    @property
    def coverage(self) -> float:
        return self.covered_pages / self.ram_pages

    @property
    def free_bytes(self) -> int:
        return self.free_pages * self.page_size


def _bad(message: str) -> ExportFormatError:
    return ExportFormatError("export-format", message)


def _check_extents(ext: list[tuple[int, int]], max_pfn: int, ram_pages: int) -> None:
    if not ext:
        raise _bad("no RAM extent")
    prev = 0
    for a, n in ext:
        if n == 0 or a < prev:
            raise _bad("RAM extents must be non-empty, sorted and disjoint")
        prev = a + n
    if prev != max_pfn or max_pfn > MAX_PFNS:
        raise _bad(f"the last RAM extent ends at {prev:#x}, max_pfn is {max_pfn:#x}")
    if sum(n for _, n in ext) != ram_pages:
        raise _bad("ram_pages is not the sum of the RAM extents")


def _check_ranges(r: np.ndarray, max_pfn: int, free_pages: int) -> None:
    if len(r) == 0:
        ok = free_pages == 0
    else:
        start, n = r[:, 0], r[:, 1]
        end = start + n
        ok = bool((start >= 0).all() and (start < max_pfn).all() and (n > 0).all()
                  and (n <= max_pfn).all() and end[-1] <= max_pfn
                  and (start[1:] > end[:-1]).all() and int(n.sum()) == free_pages)
    if not ok:
        raise _bad("the free ranges are not ascending, maximal, inside the pfn space and "
                   "summing to free_pages")


_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)


def _popcount(words: np.ndarray) -> int:
    return int(_POPCOUNT[words.view(np.uint8)].sum(dtype=np.int64))


def _ram_words(extents: list[tuple[int, int]], nwords: int) -> np.ndarray:
    """A word bitmap with the bits of the ``(start_pfn, npages)`` extents set."""
    bits = np.zeros(nwords * 64 // 8, dtype=np.uint8)
    for a, n in extents:
        b = a + n
        lo, hi = -(-a // 8), b // 8                  # whole bytes
        if lo < hi:
            bits[lo:hi] = 0xFF
            for p in [*range(a, lo * 8), *range(hi * 8, b)]:
                bits[p // 8] |= 1 << (p % 8)
        else:
            for p in range(a, b):
                bits[p // 8] |= 1 << (p % 8)
    return bits.view("<u8")


def _check_bitmaps(free: np.ndarray, covered: np.ndarray, ram: np.ndarray,
                   covered_pages: int) -> None:
    if (free & ~covered).any() or (covered & ~ram).any():
        raise _bad("a free page is not covered, or a covered page is not RAM")
    if _popcount(covered) != covered_pages:
        raise _bad("covered_pages disagrees with the covered bitmap")


def bitmap_ranges(free: np.ndarray, max_pfn: int) -> np.ndarray:
    """The maximal runs of set bits of a word bitmap over ``[0, max_pfn)`` as ``(start, n)``."""
    bits = np.unpackbits(free.view(np.uint8), bitorder="little")[:max_pfn].astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits, [0]))))
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).astype(np.int64).reshape(-1, 2)


def _read_binary(data: bytes) -> ExportedMap:
    if len(data) < HEADER.size:
        raise _bad("shorter than the header")
    h = HEADER.unpack_from(data)
    if h.version != VERSION:
        raise _bad(f"version {h.version} is not supported (this reader knows {VERSION})")
    if h.page_shift != PAGE_SHIFT:
        raise _bad(f"page_shift {h.page_shift} is not {PAGE_SHIFT}")
    fmt = {v: k for k, v in PAYLOADS.items()}.get(h.payload)
    kind = {v: k for k, v in KINDS.items()}.get(h.kind)
    state = {v: k for k, v in STATES.items()}.get(h.state)
    if fmt is None or kind is None or state is None:
        raise _bad(f"unknown payload {h.payload}, kind {h.kind} or state {h.state}")
    if h.flags & ~C.VBALLOON_EXPORT_F_COMPLETE or \
            bool(h.flags & C.VBALLOON_EXPORT_F_COMPLETE) != (state == "done"):
        raise _bad(f"flags {h.flags:#x} disagree with state {state!r}")
    if not h.free_pages <= h.covered_pages <= h.ram_pages:
        raise _bad("the page counts are inconsistent (free <= covered <= ram)")
    ext_end = HEADER.size + EXTENT.size * h.nr_extents
    if ext_end > len(data):
        raise _bad("the RAM extents run past the end of the file")
    ext = [tuple(EXTENT.unpack_from(data, HEADER.size + EXTENT.size * i))
           for i in range(h.nr_extents)]
    _check_extents(ext, h.max_pfn, h.ram_pages)
    payload = memoryview(data)[ext_end:]
    free = covered = ballooned = None
    if fmt == "ranges":
        if len(payload) != RANGE_SIZE * h.nr_ranges:
            raise _bad(f"{len(payload)} payload bytes for {h.nr_ranges} ranges")
        ranges = np.frombuffer(payload, dtype="<u8").astype(np.int64).reshape(-1, 2)
    else:
        nwords = -(-h.max_pfn // 64)
        if len(payload) != 3 * 8 * nwords:
            raise _bad(f"{len(payload)} payload bytes for three bitmaps of {nwords} words")
        words = np.frombuffer(payload, dtype="<u8").astype(np.uint64).reshape(3, nwords)
        free, covered, ballooned = words[0].copy(), words[1].copy(), words[2].copy()
        _check_bitmaps(free, covered, _ram_words(ext, nwords), h.covered_pages)
        ranges = bitmap_ranges(free, h.max_pfn)
        if len(ranges) != h.nr_ranges:
            raise _bad("nr_ranges disagrees with the free bitmap")
    _check_ranges(ranges, h.max_pfn, h.free_pages)
    return ExportedMap(fmt, h.version, 1 << h.page_shift, h.round_id, kind, state,
                       state == "done", h.requested_at_us / 1e6,
                       h.finished_at_us / 1e6 if h.finished_at_us else None, h.max_pfn,
                       tuple((a, a + n) for a, n in ext), h.ram_pages, h.covered_pages,
                       h.free_pages, ranges, free, covered, ballooned)


def _read_json(data: bytes) -> ExportedMap:
    try:
        d = json.loads(data)
        if d.get("format") != JSON_FORMAT_NAME:
            raise _bad("not a vballoon free-page map")
        if d["version"] != VERSION:
            raise _bad(f"version {d['version']} is not supported (this reader knows {VERSION})")
        r = d["round"]
        ext = [(int(a), int(n)) for a, n in d["ram"]]
        ranges = np.array(d["ranges"], dtype=np.int64).reshape(-1, 2)
        m = ExportedMap("json", d["version"], d["page-size"], r["id"], r["kind"], r["state"],
                        r["complete"], r["requested-at"], r["finished-at"], d["max-pfn"],
                        tuple((a, a + n) for a, n in ext), d["ram-pages"], d["covered-pages"],
                        d["free-pages"], ranges)
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, ExportFormatError):
            raise
        raise _bad(f"malformed JSON export: {e}") from None
    _check_extents(ext, m.max_pfn, m.ram_pages)
    _check_ranges(ranges, m.max_pfn, m.free_pages)
    if len(ranges) != d.get("range-count"):
        raise _bad("range-count disagrees with the ranges")
    return m


def read_export(path: str) -> ExportedMap:
    """Read and check an export file of any format.

    :raise ExportFormatError: the file is not a valid export, saying what is wrong.
    :raise OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] == MAGIC:
        return _read_binary(data)
    if data.lstrip()[:1] == b"{":
        return _read_json(data)
    raise _bad(f"{path}: neither a binary export (magic {MAGIC!r}) nor a JSON one")
