"""A vhost-user front-end that behaves as QEMU 11.1's generic device does.

The sequences are QEMU's (``hw/virtio/vhost.c``, ``vhost-user.c``, as recorded against QEMU
11.1.3): :meth:`Frontend.init` at device realize, :meth:`Frontend.start` at the guest's
DRIVER_OK, :meth:`Frontend.stop` at guest reset or poweroff, :meth:`Frontend.close` when QEMU
exits.  Replies are checked as QEMU checks them (flags exactly 0x5, same request code, exact
size).

The framing (header, payload, SCM_RIGHTS) is written here from the spec, not borrowed from the
daemon's transport, so a framing bug on one side shows up as a disagreement in the tests.
"""
from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from typing import NamedTuple, Sequence

from vballoon.sim.driver import DriverQueue, GuestRam, wake
from vballoon.wire import C, CONFIG, HEADER, MEM_REGION, MEMORY, U64, VRING_ADDR, VRING_STATE

log = logging.getLogger(__name__)

F_PROTOCOL_FEATURES = 1 << 30           # VHOST_USER_F_PROTOCOL_FEATURES
MAX_FDS = 8                             # fds one message may carry
# The requests this front-end sends, for its error messages (vhost-user.rst's numbering).
NAMES = {1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
         5: "SET_MEM_TABLE", 8: "SET_VRING_NUM", 9: "SET_VRING_ADDR", 10: "SET_VRING_BASE",
         11: "GET_VRING_BASE", 12: "SET_VRING_KICK", 13: "SET_VRING_CALL",
         14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES",
         17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE", 21: "SET_BACKEND_REQ_FD",
         24: "GET_CONFIG", 25: "SET_CONFIG"}


class ConnectionClosed(Exception):
    """The back-end closed the connection."""


class Message(NamedTuple):
    request: int
    flags: int
    payload: bytes
    fds: list[int]


async def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while len(out) < n:
        try:
            data, anc, _flags, _ = sock.recvmsg(n - len(out),
                                                socket.CMSG_SPACE(MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        except ConnectionResetError:
            raise ConnectionClosed("connection reset") from None
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
        if not data:
            raise ConnectionClosed("end of file")
        out += data
    return out


async def read_message(sock: socket.socket) -> Message:
    """One message: the 12-byte header {u32 request, u32 flags, u32 size}, then the payload."""
    fds: list[int] = []
    try:
        request, flags, size = HEADER.unpack(await _recv_exact(sock, HEADER.size, fds))
        payload = await _recv_exact(sock, size, fds) if size else b""
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, payload, fds)


async def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """The whole message in one sendmsg where possible; fds ride on the first part only."""
    loop = asyncio.get_running_loop()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    view = memoryview(data)
    while view:
        try:
            sent = sock.sendmsg([view], anc)
        except (BlockingIOError, InterruptedError):
            ready = loop.create_future()
            loop.add_writer(sock.fileno(), wake, ready)
            try:
                await ready
            finally:
                loop.remove_writer(sock.fileno())
            continue
        except (BrokenPipeError, ConnectionResetError):
            raise ConnectionClosed("peer went away") from None
        view, anc = view[sent:], []

WANTED_PROTOCOL = (1 << C.VHOST_USER_PROTOCOL_F_MQ | 1 << C.VHOST_USER_PROTOCOL_F_REPLY_ACK
                   | 1 << C.VHOST_USER_PROTOCOL_F_CONFIG
                   | 1 << C.VHOST_USER_PROTOCOL_F_BACKEND_REQ)


class ReplyError(Exception):
    """The back-end's reply was not what QEMU would accept, or reported failure."""


class Frontend:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.features = 0
        self.protocol_features = 0
        self.queue_num = 0
        self.num_queues = 0
        self.config_changes = 0
        self._config_event = asyncio.Event()
        self._backend: socket.socket | None = None
        self._backend_task: asyncio.Task[None] | None = None
        self.masked_call: list[int] = []
        self.err_fds: list[int] = []
        self.queues: dict[int, DriverQueue] = {}
        self.bases: dict[int, int] = {}

    @classmethod
    async def connect(cls, path: str) -> "Frontend":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        return cls(sock)

    # -- messages --------------------------------------------------------------------------

    def _acks(self) -> bool:
        return bool(self.protocol_features >> C.VHOST_USER_PROTOCOL_F_REPLY_ACK & 1)

    async def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
                   flags: int = C.VHOST_USER_VERSION) -> None:
        await send_message(self.sock, HEADER.pack(request, flags, len(payload)) + payload,
                           list(fds))

    async def recv_reply(self, request: int) -> bytes:
        msg = await read_message(self.sock)
        for fd in msg.fds:
            os.close(fd)
        if msg.flags != C.VHOST_USER_VERSION | C.VHOST_USER_REPLY_MASK:
            raise ReplyError(f"reply flags {msg.flags:#x}, expected 0x5")
        if msg.request != request:
            raise ReplyError(f"reply to {NAMES.get(msg.request)} while waiting for "
                             f"{NAMES.get(request)}")
        return msg.payload

    async def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """A request with an explicit reply (GET_*)."""
        await self.send(request, payload, fds)
        return await self.recv_reply(request)

    async def call_u64(self, request: int) -> int:
        reply = await self.call(request)
        if len(reply) != 8:
            raise ReplyError(f"{NAMES.get(request, request)}: {len(reply)}-byte reply")
        return U64.unpack(reply)[0]

    async def write(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                    sync: bool = True) -> None:
        """A request without explicit reply; with REPLY_ACK and ``sync``, wait for its ack."""
        need = sync and self._acks()
        await self.send(request, payload, fds,
                        C.VHOST_USER_VERSION | (C.VHOST_USER_NEED_REPLY_MASK if need else 0))
        if need:
            reply = await self.recv_reply(request)
            if len(reply) != 8 or U64.unpack(reply)[0] != 0:
                raise ReplyError(f"{NAMES.get(request, request)} failed (ack {reply.hex()})")

    # -- QEMU's sequences ----------------------------------------------------------------

    async def init(self, num_queues: int) -> None:
        """Device realize: vhost_dev_init."""
        self.features = await self.call_u64(C.VHOST_USER_GET_FEATURES)
        if self.features & F_PROTOCOL_FEATURES:
            offered = await self.call_u64(C.VHOST_USER_GET_PROTOCOL_FEATURES)
            self.protocol_features = offered & WANTED_PROTOCOL
            await self.write(C.VHOST_USER_SET_PROTOCOL_FEATURES,
                             U64.pack(self.protocol_features), sync=False)
        if self.protocol_features >> C.VHOST_USER_PROTOCOL_F_MQ & 1:
            self.queue_num = await self.call_u64(C.VHOST_USER_GET_QUEUE_NUM)
            if num_queues > self.queue_num:
                raise ReplyError(f"num_vqs {num_queues} exceeds the back-end's "
                                 f"{self.queue_num} queues")
        self.num_queues = num_queues
        if self.protocol_features >> C.VHOST_USER_PROTOCOL_F_BACKEND_REQ & 1:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await self.write(C.VHOST_USER_SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            ours.setblocking(False)
            self._backend = ours
            self._backend_task = asyncio.ensure_future(self._serve_backend())
        await self.write(C.VHOST_USER_SET_OWNER, sync=False)
        self.features = await self.call_u64(C.VHOST_USER_GET_FEATURES)
        for i in range(num_queues):
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)   # the masked notifier
            err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.masked_call.append(call)
            self.err_fds.append(err)
            await self.write(C.VHOST_USER_SET_VRING_CALL, U64.pack(i), [call])
            await self.write(C.VHOST_USER_SET_VRING_ERR, U64.pack(i), [err])

    async def start(self, ram: GuestRam, acked: int, queues: Sequence[DriverQueue]) -> None:
        """The guest's DRIVER_OK: vhost_dev_start."""
        await self.write(C.VHOST_USER_SET_FEATURES, U64.pack(acked | F_PROTOCOL_FEATURES),
                         sync=False)
        await self.set_mem_table(ram)
        self.queues = {q.index: q for q in queues}
        for q in queues:
            await self.write(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(q.index, q.num),
                             sync=False)
            await self.write(C.VHOST_USER_SET_VRING_BASE,
                             VRING_STATE.pack(q.index, self.bases.get(q.index, 0)), sync=False)
            await self.write(C.VHOST_USER_SET_VRING_ADDR,
                             VRING_ADDR.pack(q.index, 0, ram.uva(q.desc), ram.uva(q.used),
                                             ram.uva(q.avail), 0), sync=False)
            await self.write(C.VHOST_USER_SET_VRING_KICK, U64.pack(q.index), [q.kick_fd])
            await self.write(C.VHOST_USER_SET_VRING_CALL, U64.pack(q.index), [q.call_fd])
        for i in range(self.num_queues):
            await self.write(C.VHOST_USER_SET_VRING_ENABLE, VRING_STATE.pack(i, 1))
        for q in queues:      # vhost_virtqueue_mask(false): the guest notifier again
            await self.write(C.VHOST_USER_SET_VRING_CALL, U64.pack(q.index), [q.call_fd])

    async def set_mem_table(self, ram: GuestRam) -> None:
        payload = MEMORY.pack(len(ram.regions), 0) + b"".join(
            MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in ram.regions)
        await self.write(C.VHOST_USER_SET_MEM_TABLE, payload, [ram.fd] * len(ram.regions))

    async def stop(self) -> dict[int, int]:
        """Guest reset or poweroff: vhost_dev_stop."""
        for i in range(self.num_queues):
            await self.write(C.VHOST_USER_SET_VRING_ENABLE, VRING_STATE.pack(i, 0))
        for i in sorted(self.queues):
            reply = await self.call(C.VHOST_USER_GET_VRING_BASE, VRING_STATE.pack(i, 0))
            index, base = VRING_STATE.unpack(reply)
            if index != i:
                raise ReplyError(f"GET_VRING_BASE for {i} answered for {index}")
            self.bases[i] = base
        return dict(self.bases)

    async def get_config(self, size: int, offset: int = 0) -> bytes:
        reply = await self.call(C.VHOST_USER_GET_CONFIG,
                                CONFIG.pack(offset, size, 0) + bytes(size))
        if len(reply) != CONFIG.size + size:
            raise ReplyError(f"GET_CONFIG reply of {len(reply)} bytes, expected "
                             f"{CONFIG.size + size}")
        return reply[CONFIG.size:]

    async def set_config(self, data: bytes, offset: int = 0, migration: bool = False) -> None:
        await self.write(C.VHOST_USER_SET_CONFIG,
                         CONFIG.pack(offset, len(data), int(migration)) + data)

    # -- the backend channel -------------------------------------------------------------

    async def _serve_backend(self) -> None:
        assert self._backend is not None
        try:
            while True:
                msg = await read_message(self._backend)
                for fd in msg.fds:
                    os.close(fd)
                if msg.request == C.VHOST_USER_BACKEND_CONFIG_CHANGE_MSG:
                    self.config_changes += 1
                    self._config_event.set()
                if msg.flags & C.VHOST_USER_NEED_REPLY_MASK:
                    await send_message(self._backend, HEADER.pack(
                        msg.request, C.VHOST_USER_VERSION | C.VHOST_USER_REPLY_MASK, 8)
                        + U64.pack(0))
        except ConnectionClosed:
            pass

    async def wait_config_change(self, timeout: float | None = 5.0) -> None:
        await asyncio.wait_for(self._config_event.wait(), timeout)
        self._config_event.clear()

    async def close(self) -> None:
        if self._backend_task is not None:
            self._backend_task.cancel()
            try:
                await self._backend_task
            except asyncio.CancelledError:
                pass
        if self._backend is not None:
            self._backend.close()
        self.sock.close()
        for fd in self.masked_call + self.err_fds:
            os.close(fd)
        self.masked_call, self.err_fds = [], []
