"""asyncio edge of the vhost-user back-end: the listening socket, message framing with fds
(SCM_RIGHTS), kick eventfds, and the backend channel.  No protocol logic lives here.

One front-end at a time (vhost-user is point to point).  When it goes away, for whatever
reason, the session is closed (every fd, every mapping) and the next connection is served.
"""
from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from typing import Callable

from vballoon.virtio.device import Device
from vballoon.errors import FrontendError
from vballoon.sockets import listen_unix
from vballoon.vhost.session import Action, Message, Session
from vballoon.wire import C, HEADER

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
# Room for exactly the fds a message may carry: with more, the kernel truncates the list and
# sets MSG_CTRUNC, and the connection is closed (the message cannot be trusted whole).
_ANC_SIZE = socket.CMSG_SPACE(C.VHOST_USER_MAX_FDS * _FD_SIZE)


class ConnectionClosed(Exception):
    pass


async def _wait_readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


def _take_fds(ancdata: list, flags: int, fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(data) // _FD_SIZE
            fds.extend(array.array("i", data[:n * _FD_SIZE]))
    if flags & socket.MSG_CTRUNC:
        raise FrontendError("fd-truncated", "more fds than the back-end accepts "
                            f"({C.VHOST_USER_MAX_FDS}); message refused")


async def recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    """Read exactly ``n`` bytes; fds that arrive meanwhile are appended to ``fds``."""
    loop = asyncio.get_running_loop()
    chunks, got = [], 0
    while got < n:
        try:
            data, anc, flags, _ = sock.recvmsg(n - got, _ANC_SIZE)
        except (BlockingIOError, InterruptedError):
            await _wait_readable(loop, sock.fileno())
            continue
        except ConnectionResetError:
            raise ConnectionClosed("connection reset") from None
        _take_fds(anc, flags, fds)
        if not data:
            raise ConnectionClosed("end of file" if got == 0 else "end of file inside a message")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


async def read_message(sock: socket.socket, check: Callable[[int, int, int], None]) -> Message:
    """One vhost-user message: header (checked by ``check`` before the payload is read)."""
    fds: list[int] = []
    try:
        request, flags, size = HEADER.unpack(await recv_exact(sock, HEADER.size, fds))
        check(request, flags, size)
        payload = await recv_exact(sock, size, fds) if size else b""
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, payload, fds)


async def send_message(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Write a whole message; fds ride on the first sendmsg only (never repeated)."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while view:
        try:
            sent = sock.sendmsg([view], anc)
        except (BlockingIOError, InterruptedError):
            fut = loop.create_future()
            loop.add_writer(sock.fileno(), lambda: fut.done() or fut.set_result(None))
            try:
                await fut
            finally:
                loop.remove_writer(sock.fileno())
            continue
        except (BrokenPipeError, ConnectionResetError):
            raise ConnectionClosed("peer went away") from None
        view, anc = view[sent:], []


class Connection:
    """Carries one front-end's session: reads requests, applies the session's actions."""

    def __init__(self, sock: socket.socket, device: Device) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.watched: dict[int, int] = {}
        self.backend: socket.socket | None = None
        self._backend_of: int | None = None     # the session's fd that ``backend`` dups
        self._closing: str | None = None
        self.closed = False
        self.session = Session(device, self._apply)

    def _apply(self, action: Action) -> None:
        if action.kind == "watch":
            self.loop.add_reader(action.fd, self._on_kick, action.index, action.fd)
            self.watched[action.index] = action.fd
        elif action.kind == "unwatch":
            fd = self.watched.pop(action.index, None)
            if fd is not None:
                self.loop.remove_reader(fd)
        elif action.kind == "backend":
            self._send_backend(action.data)
        elif action.kind == "close":
            self._closing = action.reason

    def _on_kick(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        try:
            self.session.kick(index)
        except Exception:   # a bug, not the guest (GuestError is handled in the session)
            log.exception("queue %d: processing failed; queue stopped", index)
            self.session.rings[index].broken = True

    def _send_backend(self, data: bytes) -> None:
        fd = self.session.backend_fd
        if fd is None:
            return
        if self._backend_of != fd:            # a new SET_BACKEND_REQ_FD since the last send
            if self.backend is not None:
                self.backend.close()
            self.backend = socket.socket(fileno=os.dup(fd))
            self.backend.setblocking(False)
            self._backend_of = fd
        assert self.backend is not None
        try:
            self.backend.send(data)
        except BlockingIOError:
            log.warning("backend channel full; config change dropped (the next one carries it)")
        except OSError as e:
            log.error("backend channel: %s", e)

    async def run(self) -> None:
        try:
            while self._closing is None:
                try:
                    msg = await read_message(self.sock, Session.check_header)
                except FrontendError as e:
                    log.error("front-end error, closing the connection: %s", e)
                    return
                except ConnectionClosed as e:
                    log.info("front-end disconnected (%s)", e)
                    return
                reply = self.session.handle(msg)
                if reply is not None:
                    await send_message(self.sock, reply)
            log.error("closing the connection: %s", self._closing)
        except ConnectionClosed as e:
            log.info("front-end disconnected (%s)", e)
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.session.close()          # emits unwatch for every kick fd, then closes them
        for fd in list(self.watched.values()):
            self.loop.remove_reader(fd)
        self.watched.clear()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self.sock.close()


class Server:
    """Serves one device on a Unix socket, one front-end at a time, until :meth:`close`."""

    def __init__(self, path: str, device: Device) -> None:
        self.path = path
        self.device = device
        self.sock = listen_unix(path)
        self.connection: Connection | None = None
        self.connections_served = 0
        self._task: asyncio.Task[None] | None = None
        self._accept: asyncio.Task[None] | None = None

    def start(self) -> "asyncio.Task[None]":
        """Start accepting front-ends in the background."""
        self._accept = asyncio.ensure_future(self._accept_loop())
        return self._accept

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            if self.connection is not None:
                log.error("a second front-end connected while one is served; refused")
                conn.close()
                continue
            conn.setblocking(False)
            self.connections_served += 1
            log.info("front-end connected (#%d)", self.connections_served)
            self.connection = Connection(conn, self.device)
            self._task = asyncio.ensure_future(self._carry(self.connection))

    async def _carry(self, c: Connection) -> None:
        try:
            await c.run()
        except Exception:
            log.exception("connection failed")
            c.close()
        finally:
            self.connection = None

    @property
    def connected(self) -> bool:
        """A front-end is connected."""
        return self.connection is not None

    @property
    def driver_attached(self) -> bool:
        """A front-end is connected and the guest's driver has set its features."""
        return self.connection is not None and self.connection.session.features_set

    async def close(self) -> None:
        for task in (self._accept, self._task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self.connection is not None:
            self.connection.close()
        self.sock.close()
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)
        except OSError:
            pass
