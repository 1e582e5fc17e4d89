"""The control socket: QMP over a Unix socket, for the CLI, scripts and migration engines.

The protocol core is :mod:`vballoon.control.qmp` (sans-IO); this module is its asyncio side and
the commands, which call a service (:class:`vballoon.control.models.ControlService`; the
balloon's is :class:`vballoon.app.service.BalloonService`).  The commands, their
arguments and their replies are specified in ``protocol/control-socket.md``.

- The socket is created mode 0600 (fchmod before bind), then renamed into place, so the
  path only ever names a listening socket only its owner can connect to.
- Any number of clients; each has its own QMP session and task.  One client's bad input, slow
  command or disconnect never reaches another: errors are answered on its own session, and a
  client that stops reading its replies is disconnected once it has
  :data:`MAX_OUTPUT_BACKLOG` bytes waiting.
- Commands of one client run one at a time, in order (qmp-spec, "Out-of-band execution").
  While one runs, the client's socket is still read, so that a client which goes away is
  noticed: its command is cancelled (a round it started goes on).
- Events (``BALLOON_CHANGE``, ``FREE_PAGE_ROUND_COMPLETED``) go to every client that has left
  negotiation mode, stamped with the time they happened.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import select
import time
from typing import Any, Awaitable, Callable

from vballoon import __version__
from vballoon.control import qmp
from vballoon.errors import DeviceNotActive, VballoonError
from vballoon.control.models import ControlService
from vballoon.control.qmp import GENERIC_ERROR, Command, CommandError, Enum
from vballoon.sockets import listen_unix

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
MAX_BACKLOG = 4 * qmp.MAX_MESSAGE_SIZE     # unprocessed input held while a command runs
MAX_OUTPUT_BACKLOG = 16 << 20              # unread output before a client is disconnected
MAX_RANGES = 1 << 16                       # ranges in one query-free-page-round reply
DEFAULT_RANGES = 1024

ROUND_KIND = Enum("FreePageRoundKind", ("bitmap", "hint", "auto"))
MAP_FORMAT = Enum("FreePageMapFormat", ("ranges", "bitmap", "json"))

COMMANDS = (
    Command("query-version", {}, "The daemon's version, as QEMU's query-version."),
    Command("query-commands", {}, "The commands this socket accepts, as QEMU's."),
    Command("balloon", {"value": "int"},
            "QEMU's balloon: ask for a guest of 'value' bytes (its memory size after "
            "ballooning)."),
    Command("query-balloon", {}, "QEMU's query-balloon: {actual}, the guest's memory size "
            "after ballooning, in bytes."),
    Command("query-guest-stats", {}, "The guest's last memory statistics, in the shape of "
            "QEMU's guest-stats property."),
    Command("start-free-page-round", {"*kind": ROUND_KIND, "*wait": "bool", "*timeout": "number"},
            "Ask the guest for its free pages; start dirty tracking before.  With 'wait', "
            "answer when the round ended (or fail after 'timeout' seconds)."),
    Command("query-free-page-round",
            {"*id": "int", "*ranges": "bool", "*max-ranges": "int", "*start-pfn": "int"},
            "A round's summary (default: the latest); with 'ranges', up to 'max-ranges' of "
            "its free ranges from 'start-pfn' on."),
    Command("export-free-page-map", {"*id": "int", "filename": "str", "format": MAP_FORMAT},
            "Write a round's map (default: the latest) to 'filename' in the export directory."),
)


def version_info() -> dict[str, Any]:
    """QEMU's VersionInfo, carrying vballoon's version."""
    parts = [int(p) if p.isdigit() else 0 for p in __version__.split(".")[:3]]
    major, minor, micro = parts + [0] * (3 - len(parts))
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"vballoon {__version__}"}


def _desc(e: VballoonError) -> str:
    """The message of a vballoon error without its rule prefix."""
    text = str(e)
    return text.split(": ", 1)[1] if text.startswith(f"{e.rule}: ") else text


def _peer_gone(writer: asyncio.StreamWriter) -> bool:
    """After EOF: did the peer close its socket (POLLHUP), or only shut down its sending side?
    (Linux sets POLLHUP on an AF_UNIX stream socket once both directions are shut down.)"""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return True
    p = select.poll()
    p.register(sock.fileno(), select.POLLHUP)
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in p.poll(0))


class _Client:
    """One control connection: its QMP session and where its bytes go."""

    serial = 0

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        _Client.serial += 1
        self.name = f"control client #{_Client.serial}"
        self.conn = qmp.ServerConnection(COMMANDS, version_info())
        self.writer = writer

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if not data or self.writer.is_closing():
            return
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > MAX_OUTPUT_BACKLOG:
            log.warning("%s does not read its replies (%d bytes waiting); disconnected",
                        self.name, self.writer.transport.get_write_buffer_size())
            self.writer.transport.abort()


class ControlServer:
    """Serves ``service`` as QMP on the Unix socket ``path`` (mode 0600).  ``on_command`` is
    called after every command (the daemon re-arms its timer then)."""

    def __init__(self, path: str, service: ControlService, *,
                 on_command: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.service = service
        self.on_command = on_command
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self._handlers: dict[str, Callable[[_Client, dict[str, Any]], Awaitable[Any]]] = {
            "query-version": self._query_version,
            "query-commands": self._query_commands,
            "balloon": self._balloon,
            "query-balloon": self._query_balloon,
            "query-guest-stats": self._query_guest_stats,
            "start-free-page-round": self._start_round,
            "query-free-page-round": self._query_round,
            "export-free-page-map": self._export,
        }
        assert set(self._handlers) == {c.name for c in COMMANDS}

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen.  :raise ConfigError: the path is in use, or not a socket, or unusable."""
        sock = listen_unix(self.path, mode=0o600)     # born 0600: never open to others
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        self.service.subscribe(self._broadcast)
        log.info("control socket on %s", self.path)

    async def close(self) -> None:
        """Stop listening, disconnect every client, remove the socket."""
        self.service.unsubscribe(self._broadcast)
        if self._server is None:
            return
        self._server.close()
        # Clients end on their own when told (a cancelled connection task is reported as an
        # error by asyncio's stream callback).
        self._closing.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    @property
    def clients(self) -> int:
        """Clients connected now."""
        return len(self._clients)

    # -- one client -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = _Client(writer)
        self._clients.add(client)
        log.debug("%s connected", client.name)
        running: asyncio.Task[None] | None = None
        reading: asyncio.Task[bytes] | None = None
        closing = asyncio.ensure_future(self._closing.wait())
        eof = False
        try:
            while True:
                ev = client.conn.next_event()
                if isinstance(ev, qmp.Execute):
                    running = asyncio.ensure_future(self._run(client, ev))
                    continue                # next_event() is PAUSED until it is answered
                client.flush()
                if ev is qmp.CLOSED:
                    break
                if reading is None and not eof and client.conn.buffered < MAX_BACKLOG:
                    reading = asyncio.ensure_future(reader.read(READ_SIZE))
                waiting = [t for t in (running, reading, closing) if t is not None]
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if closing in done:
                    break
                if running is not None and running in done:
                    running.result()
                    running = None
                if reading is not None and reading in done:
                    data, reading = reading.result(), None
                    client.conn.receive_data(data)
                    eof = not data
                    if eof and running is not None and _peer_gone(writer):
                        log.info("%s went away while %s ran; cancelled", client.name,
                                 client.conn.pending.command if client.conn.pending else "?")
                        running.cancel()
                        await asyncio.gather(running, return_exceptions=True)
                        break
        except (ConnectionError, OSError) as e:
            log.info("%s: %s", client.name, e)
        finally:
            tasks = [t for t in (running, reading, closing) if t is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._clients.discard(client)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._tasks.discard(task)
            log.debug("%s disconnected", client.name)

    async def _run(self, client: _Client, ex: qmp.Execute) -> None:
        """Run one command and answer it; every failure becomes a QMP error on this session."""
        log.debug("%s: %s %s", client.name, ex.command, ex.arguments)
        try:
            result = await self._handlers[ex.command](client, ex.arguments)
        except CommandError as e:
            client.conn.send_error(e.error_class, e.desc)
        except VballoonError as e:
            cls = qmp.DEVICE_NOT_ACTIVE if isinstance(e, DeviceNotActive) else GENERIC_ERROR
            client.conn.send_error(cls, _desc(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("%s: %s failed", client.name, ex.command)
            client.conn.send_error(GENERIC_ERROR, f"internal error: {type(e).__name__}: {e}")
        else:
            client.conn.send_return(result)
        client.flush()
        try:
            self.on_command()
        except Exception:
            log.exception("on_command failed")

    # -- events -----------------------------------------------------------------------------

    def _broadcast(self, event: str, data: dict[str, Any]) -> None:
        """A daemon listener: called from the device's code, so it must never raise."""
        now = time.time()
        for client in list(self._clients):
            try:
                if client.conn.send_event(event, data, now):
                    client.flush()
            except Exception:
                log.exception("%s: event %s not sent", client.name, event)

    # -- the commands (protocol/control-socket.md) ----------------------------------------------

    async def _query_version(self, client: _Client, args: dict[str, Any]) -> Any:
        return version_info()

    async def _query_commands(self, client: _Client, args: dict[str, Any]) -> Any:
        return [{"name": name} for name in sorted(client.conn.commands)]

    async def _balloon(self, client: _Client, args: dict[str, Any]) -> Any:
        self.service.balloon(args["value"])
        return {}

    async def _query_balloon(self, client: _Client, args: dict[str, Any]) -> Any:
        return self.service.query_balloon().to_qmp()

    async def _query_guest_stats(self, client: _Client, args: dict[str, Any]) -> Any:
        return self.service.guest_stats().to_qmp()

    async def _start_round(self, client: _Client, args: dict[str, Any]) -> Any:
        timeout = args.get("timeout")
        if timeout is not None:
            if not args.get("wait"):
                raise CommandError(GENERIC_ERROR, "Parameter 'timeout' needs 'wait': true")
            if not (math.isfinite(timeout) and timeout > 0):
                raise CommandError(GENERIC_ERROR,
                                   "Parameter 'timeout' expects a positive number of seconds")
        info = self.service.start_round(args.get("kind", "auto"))
        self.on_command()          # the round's deadline, while the command waits
        if args.get("wait"):
            try:
                info = await self.service.wait_round(info.id, timeout)
            except TimeoutError:
                raise CommandError(GENERIC_ERROR, f"free page round {info.id} did not end "
                                   f"within {timeout:g} s; it goes on (see "
                                   "query-free-page-round)") from None
        return info.to_qmp()

    async def _query_round(self, client: _Client, args: dict[str, Any]) -> Any:
        limit = args.get("max-ranges", DEFAULT_RANGES)
        if not 0 <= limit <= MAX_RANGES:
            raise CommandError(GENERIC_ERROR, f"Parameter 'max-ranges' expects an integer "
                               f"from 0 to {MAX_RANGES}")
        return self.service.query_round(args.get("id"), ranges=bool(args.get("ranges")),
                                        max_ranges=limit,
                                        start_pfn=args.get("start-pfn", 0)).to_qmp()

    async def _export(self, client: _Client, args: dict[str, Any]) -> Any:
        res = await self.service.export_map(args.get("id"), args["filename"], args["format"])
        return res.to_qmp()
