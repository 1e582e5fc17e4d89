"""asyncio edge of the vhost-user back-end: the listening socket, message framing with fds
(SCM_RIGHTS), kick eventfds, and the backend channel.  No protocol logic lives here: the
session's typed actions are carried out (:meth:`Connection._apply`), and the fds they hand over
(the backend channel) are owned here.

One front-end at a time (vhost-user is point to point).  When it goes away, for whatever
reason, the session is closed (every fd, every mapping) and the next connection is served.  A
connection that arrives while the previous front-end's end of file is still unprocessed waits
for it (never refused for that race); one that arrives while a live front-end is served is
refused.  Accept errors (EMFILE, ENFILE, ENOMEM, ...) are logged and retried after a short
back-off: the accept loop never dies.
"""
from __future__ import annotations

import array
import asyncio
import logging
import os
import select
import socket
from typing import Callable

from vballoon.virtio.device import Device
from vballoon.errors import FrontendError
from vballoon.sockets import listen_unix
from vballoon.vhost.fds import close_fds, signal_eventfd
from vballoon.ratelimit import install_rate_limit
from vballoon.vhost.session import (Action, Close, CloseFds, Message, QueueStatus, Resume,
                                    SendBackend, Session, SetBackendChannel, Signal, Unwatch,
                                    Watch)
from vballoon.wire import C, HEADER

log = logging.getLogger(__name__)


def _wake(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)

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
            loop.add_writer(sock.fileno(), _wake, fut)
            try:
                await fut
            finally:
                loop.remove_writer(sock.fileno())
            continue
        except (BrokenPipeError, ConnectionResetError):
            raise ConnectionClosed("peer went away") from None
        view, anc = view[sent:], []


class Connection:
    """Carries one front-end's session: reads requests, carries out the session's actions."""

    def __init__(self, sock: socket.socket, device: Device,
                 on_activity: Callable[[], None] = lambda: None) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.watched: dict[int, int] = {}
        self.backend: socket.socket | None = None
        self._closing: str | None = None
        self._resume: set[int] = set()            # queues with a Resume scheduled
        self._on_activity = on_activity
        self.closed = False
        self.session = Session(device, self._apply)

    # -- actions ---------------------------------------------------------------------------

    def _apply(self, action: Action) -> None:
        if isinstance(action, Watch):
            try:
                self.loop.add_reader(action.fd, self._on_kick, action.index, action.fd)
            except (OSError, ValueError) as e:      # e.g. EPERM: not pollable
                self.session.kick_failed(action.index, f"cannot watch the kick fd: {e}")
                return
            self.watched[action.index] = action.fd
        elif isinstance(action, Unwatch):
            if self.watched.get(action.index) == action.fd:
                del self.watched[action.index]
                self.loop.remove_reader(action.fd)
        elif isinstance(action, Signal):
            signal_eventfd(action.fd)
        elif isinstance(action, CloseFds):
            close_fds(action.fds)
        elif isinstance(action, SetBackendChannel):
            if self.backend is not None:
                self.backend.close()
            self.backend = socket.socket(fileno=action.fd)
            self.backend.setblocking(False)
        elif isinstance(action, SendBackend):
            self._send_backend(action.data)
        elif isinstance(action, Resume):
            if action.index not in self._resume:
                self._resume.add(action.index)
                self.loop.call_soon(self._on_resume, action.index)
        elif isinstance(action, Close):
            if self._closing is None:
                self._closing = action.reason
                try:                # wake the reader: it sees end of file and closes
                    self.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        else:                                       # pragma: no cover - a new action type
            raise TypeError(f"unknown action {action!r}")

    def _on_kick(self, index: int, fd: int) -> None:
        try:
            data = os.read(fd, 8)
        except BlockingIOError:
            return
        except OSError as e:
            self.session.kick_failed(index, f"read: {e}")
            return
        if len(data) != 8:
            self.session.kick_failed(index, "end of file" if not data else
                                     f"a {len(data)}-byte read")
            return
        self.session.kick(index)
        self._on_activity()

    def _on_resume(self, index: int) -> None:
        self._resume.discard(index)
        if not self.closed:
            self.session.resume(index)
            self._on_activity()

    def _send_backend(self, data: bytes) -> None:
        if self.backend is None:
            return
        try:
            self.backend.send(data)
        except BlockingIOError:
            log.warning("backend channel full; config change dropped (the next one carries it)")
        except OSError as e:
            log.error("backend channel: %s", e)

    # -- the connection --------------------------------------------------------------------

    def peer_gone(self) -> bool:
        """The front-end closed its end (its end of file may still be unread here)."""
        if self.closed:
            return True
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _, ev in p.poll(0))

    async def run(self) -> None:
        try:
            while self._closing is None:
                try:
                    msg = await read_message(self.sock, Session.check_header)
                except FrontendError as e:
                    log.error("front-end error, closing the connection: %s", e)
                    return
                except ConnectionClosed as e:
                    if self._closing is None:
                        log.info("front-end disconnected (%s)", e)
                    break
                reply = self.session.handle(msg)
                if reply is not None:
                    await send_message(self.sock, reply)
                self._on_activity()
            if self._closing is not None:
                log.error("closing the connection: %s", self._closing)
        except ConnectionClosed as e:
            log.info("front-end disconnected (%s)", e)
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.session.close()      # unwatches and closes every kick fd, unmaps memory
        finally:
            for fd in list(self.watched.values()):
                self.loop.remove_reader(fd)
            self.watched.clear()
            if self.backend is not None:
                self.backend.close()
                self.backend = None
            self.sock.close()

    def queue_status(self) -> list[QueueStatus]:
        return self.session.queue_status()


ACCEPT_BACKOFF = 0.1      # seconds between accept retries after an error (EMFILE, ...)


class Server:
    """Serves one device on a Unix socket, one front-end at a time, until :meth:`close`.

    ``on_activity`` is called after every processed message or kick (and resumed queue): the
    daemon re-arms its deadline timer there.  A plain attribute; a no-op by default.
    """

    def __init__(self, path: str | None, device: Device, *, sock: socket.socket | None = None,
                 mode: int | None = None, group: int | None = None) -> None:
        """Listen on ``path`` (made here with ``mode`` and ``group``, removed at
        :meth:`close`), or serve ``sock``, a listening socket made by someone else (``--fd``,
        systemd): then nothing is removed."""
        self.path = path
        self.device = device
        self._owns_path = sock is None
        if sock is None:
            if path is None:
                raise ValueError("Server needs a path or a listening socket")
            sock = listen_unix(path, mode, group)
        self.sock = sock
        self.connection: Connection | None = None
        self.connections_served = 0
        self.connections_refused = 0
        self.accept_errors = 0
        self.on_activity: Callable[[], None] = lambda: None
        device.transport_reschedules = True     # a Resume action runs a bounded queue again
        self._task: asyncio.Task[None] | None = None
        self._accept: asyncio.Task[None] | None = None
        # guest- and front-end-triggered logs of this device and of the vhost layers
        self._remove_rate_limit = install_rate_limit(type(device).__module__)

    def start(self) -> "asyncio.Task[None]":
        """Start accepting front-ends in the background."""
        self._accept = asyncio.ensure_future(self._accept_loop())
        return self._accept

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as e:
                # EMFILE and friends: the pending connection stays queued; try again soon.
                self.accept_errors += 1
                log.error("accept-failed: %s; retrying in %.1fs", e, ACCEPT_BACKOFF)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            try:
                await self._serve(conn)
            except Exception:
                log.exception("internal-error: serving a new front-end failed")
                conn.close()

    async def _serve(self, conn: socket.socket) -> None:
        old = self.connection
        if old is not None and old.peer_gone() and self._task is not None:
            # The previous front-end has closed; its end of file is not processed yet.  Let
            # it finish (it only has buffered requests and that EOF left), then serve this one.
            log.info("a front-end connected while the previous one is ending; it waits")
            await asyncio.shield(self._task)
        if self.connection is not None:
            self.connections_refused += 1
            log.error("a second front-end connected while one is served; refused")
            conn.close()
            return
        conn.setblocking(False)
        self.connections_served += 1
        log.info("front-end connected (#%d)", self.connections_served)
        self.connection = Connection(conn, self.device, self._activity)
        self._task = asyncio.ensure_future(self._carry(self.connection))

    def _activity(self) -> None:
        self.on_activity()

    async def _carry(self, c: Connection) -> None:
        try:
            await c.run()
        except Exception:
            log.exception("connection failed")
            c.close()
        finally:
            if self.connection is c:
                self.connection = None

    @property
    def connected(self) -> bool:
        """A front-end is connected."""
        return self.connection is not None

    @property
    def driver_attached(self) -> bool:
        """A front-end is connected and the guest's driver has set its features."""
        return self.connection is not None and self.connection.session.features_set

    def queue_status(self) -> list[QueueStatus]:
        """Each queue of the connected front-end (empty when none is)."""
        return [] if self.connection is None else self.connection.queue_status()

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
        self._remove_rate_limit()
        if self._owns_path and self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
