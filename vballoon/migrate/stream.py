"""The migration stream between `vballoon migrate` source and destination (protocol/migration-stream.md).

Sans-IO: :class:`FrameDecoder` takes bytes and yields frames, checking every length and bound
before anything is allocated or written; the asyncio helpers below only move bytes.

    frame  = header payload
    header = type:u16 flags:u16 length:u32         (little-endian, 8 bytes; flags must be 0)
    CONTROL (1): UTF-8 JSON object, <= 64 KiB, with a string member "type"
    PAGES   (2): first:u64 count:u32 zero:u32, then count * page_size bytes of page data
    ZERO    (3): first:u64 count:u64              (pages the destination must read as zero)
"""
from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import Any, Iterator

MAGIC = "vballoon-migrate"
VERSION = 1
CONTROL, PAGES, ZERO = 1, 2, 3
HEADER = struct.Struct("<HHI")
PAGES_HEAD = struct.Struct("<QII")
ZERO_BODY = struct.Struct("<QQ")
MAX_CONTROL = 64 << 10
MAX_BATCH = 256  # pages per PAGES frame (1 MiB of 4 KiB pages)


class StreamError(Exception):
    """The peer sent something this end does not accept; the message says what."""


@dataclass(frozen=True)
class Control:
    msg: dict[str, Any]

    @property
    def type(self) -> str:
        return self.msg["type"]


@dataclass(frozen=True)
class Pages:
    first: int
    count: int
    data: memoryview  # count * page_size bytes


@dataclass(frozen=True)
class Zero:
    first: int
    count: int


Frame = Control | Pages | Zero


def encode_control(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_CONTROL:
        raise ValueError(f"control message of {len(body)} bytes exceeds {MAX_CONTROL}")
    return HEADER.pack(CONTROL, 0, len(body)) + body


def encode_pages_header(first: int, count: int, page_size: int) -> bytes:
    return HEADER.pack(PAGES, 0, PAGES_HEAD.size + count * page_size) + PAGES_HEAD.pack(first, count, 0)


def encode_zero(first: int, count: int) -> bytes:
    return HEADER.pack(ZERO, 0, ZERO_BODY.size) + ZERO_BODY.pack(first, count)


def _no_dup_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise StreamError(f"control message has a duplicate key {k!r}")
        d[k] = v
    return d


def _bad_constant(name: str) -> Any:
    raise StreamError(f"control message contains {name}, which is not JSON")


class FrameDecoder:
    """Bytes in, frames out.  `npages`/`page_size` bound every page reference; until they are
    known (before the hello), page frames are refused."""

    def __init__(self, *, page_size: int = 4096, npages: int = 0) -> None:
        self.page_size = page_size
        self.npages = npages
        self._buf = bytearray()

    def max_length(self, type_: int) -> int:
        return {CONTROL: MAX_CONTROL, PAGES: PAGES_HEAD.size + MAX_BATCH * self.page_size,
                ZERO: ZERO_BODY.size}.get(type_, -1)

    def feed(self, data: bytes) -> Iterator[Frame]:
        self.push(data)
        while (frame := self.pop()) is not None:
            yield frame

    def push(self, data: bytes) -> None:
        self._buf += data

    def pop(self) -> Frame | None:
        """The next complete frame, or None.  One at a time: a frame is checked against the
        bounds in force when it is taken (the hello sets them)."""
        return self._next()

    def need(self) -> int:
        """How many more bytes complete the frame under way (at least 1)."""
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        _, _, length = HEADER.unpack_from(self._buf)
        return max(1, HEADER.size + length - len(self._buf))

    def _next(self) -> Frame | None:
        if len(self._buf) < HEADER.size:
            return None
        type_, flags, length = HEADER.unpack_from(self._buf)
        limit = self.max_length(type_)
        if limit < 0:
            raise StreamError(f"unknown frame type {type_}")
        if flags:
            raise StreamError(f"frame flags {flags:#x} set (must be 0)")
        if length > limit:
            raise StreamError(f"frame of type {type_} is {length} bytes long; at most {limit}")
        if len(self._buf) < HEADER.size + length:
            return None
        body = bytes(self._buf[HEADER.size:HEADER.size + length])
        del self._buf[:HEADER.size + length]
        if type_ == CONTROL:
            return Control(self._control(body))
        if type_ == ZERO:
            if length != ZERO_BODY.size:
                raise StreamError(f"ZERO frame of {length} bytes; expected {ZERO_BODY.size}")
            first, count = ZERO_BODY.unpack(body)
            self._check_range("ZERO", first, count)
            return Zero(first, count)
        if length < PAGES_HEAD.size:
            raise StreamError(f"PAGES frame of {length} bytes is shorter than its header")
        first, count, zero = PAGES_HEAD.unpack_from(body)
        if zero:
            raise StreamError("PAGES frame: reserved field is not 0")
        if count > MAX_BATCH:
            raise StreamError(f"PAGES frame of {count} pages; at most {MAX_BATCH}")
        if length != PAGES_HEAD.size + count * self.page_size:
            raise StreamError(f"PAGES frame: {count} pages need {PAGES_HEAD.size + count * self.page_size}"
                              f" bytes, got {length}")
        self._check_range("PAGES", first, count)
        return Pages(first, count, memoryview(body)[PAGES_HEAD.size:])

    def _check_range(self, what: str, first: int, count: int) -> None:
        if self.npages == 0:
            raise StreamError(f"{what} frame before the RAM layout was agreed")
        if count == 0 or first >= self.npages or count > self.npages - first:
            raise StreamError(f"{what} frame: pages [{first}, {first}+{count}) outside RAM of "
                              f"{self.npages} pages")

    @staticmethod
    def _control(body: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(body.decode("utf-8"), object_pairs_hook=_no_dup_keys,
                             parse_constant=_bad_constant)
        except UnicodeDecodeError:
            raise StreamError("control message is not UTF-8") from None
        except RecursionError:
            raise StreamError("control message nests too deeply") from None
        except json.JSONDecodeError as e:
            raise StreamError(f"control message is not JSON: {e.msg}") from None
        if not isinstance(msg, dict):
            raise StreamError("control message is not a JSON object")
        if not isinstance(msg.get("type"), str):
            raise StreamError("control message lacks a string member 'type'")
        return msg


def check_hello(msg: dict[str, Any], *, page_size: int, ram_bytes: int) -> None:
    """The peer's hello against this end's RAM layout; StreamError says what differs."""
    if msg.get("type") != "hello" or msg.get("magic") != MAGIC:
        raise StreamError("the peer is not a vballoon migration endpoint (no hello)")
    if msg.get("version") != VERSION:
        raise StreamError(f"the peer speaks version {msg.get('version')!r}; this end {VERSION}")
    for key, mine in (("page-size", page_size), ("ram-bytes", ram_bytes)):
        theirs = msg.get(key)
        if not isinstance(theirs, int) or isinstance(theirs, bool):
            raise StreamError(f"hello: {key!r} is missing or not an integer")
        if theirs != mine:
            raise StreamError(f"RAM layout differs: {key} is {theirs} there, {mine} here")


def hello(*, page_size: int, ram_bytes: int, **extra: Any) -> dict[str, Any]:
    return {"type": "hello", "magic": MAGIC, "version": VERSION, "page-size": page_size,
            "ram-bytes": ram_bytes, **extra}


class Channel:
    """A stream with frames: asyncio reader/writer around a FrameDecoder."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 page_size: int = 4096, idle_timeout: float = 120.0) -> None:
        self.reader, self.writer = reader, writer
        self.idle_timeout = idle_timeout
        self.decoder = FrameDecoder(page_size=page_size)
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, *parts: bytes | memoryview) -> None:
        for p in parts:
            self.writer.write(p)
            self.bytes_sent += len(p)
        await self.writer.drain()

    async def send_control(self, msg: dict[str, Any]) -> None:
        await self.send(encode_control(msg))

    async def recv(self) -> Frame:
        while (frame := self.decoder.pop()) is None:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    data = await self.reader.read(max(self.decoder.need(), 1 << 16))
            except TimeoutError:
                raise StreamError(f"the peer sent nothing for {self.idle_timeout:.0f} s") from None
            except ConnectionError as e:
                raise StreamError(f"the migration stream broke: {e}") from None
            if not data:
                raise StreamError("the peer closed the migration stream")
            self.bytes_received += len(data)
            self.decoder.push(data)
        return frame

    async def recv_control(self, *expected: str) -> dict[str, Any]:
        frame = await self.recv()
        if not isinstance(frame, Control):
            raise StreamError(f"expected a control message ({', '.join(expected)}), got page data")
        if frame.type == "error":
            raise StreamError(f"the peer failed: {frame.msg.get('message', '?')}")
        if expected and frame.type not in expected:
            raise StreamError(f"expected {' or '.join(expected)}, got {frame.type!r}")
        return frame.msg

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, RuntimeError):
            pass
