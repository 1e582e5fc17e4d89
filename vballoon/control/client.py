"""The migration hook's Python API: a client of the daemon's control socket.

A migration engine that tracks dirty pages itself uses it like this (the contract is in
``protocol/bitmap-queue.md`` §7: dirty tracking starts *before* the round is requested)::

    from vballoon.control.client import Client

    with Client("/run/vballoon/control.sock") as vb:
        start_dirty_tracking()                       # the engine's own
        r = vb.start_round("bitmap", wait=True, timeout=30)
        skip = vb.free_ranges(r.id)                  # (n, 2) int64: start_pfn, npages
        copy_ram_except(skip); resend_dirty_pages()

:class:`AsyncClient` is the asyncio core; :class:`Client` is a synchronous facade over it,
running the core on a private event loop in a background thread (so it works from any
thread, inside or outside an event loop) -- qemu.qmp's ``legacy.py`` pattern.  Replies are
typed (:class:`BalloonInfo`, :class:`GuestStats`, :class:`RoundInfo`, :class:`ExportInfo`);
a failed command raises :class:`QMPCommandError` carrying QMP's error class; a lost or refused
connection raises :class:`QMPConnectionError`.

Events are kept from the moment the session is negotiated (the last :data:`EVENT_HISTORY`),
each with a serial number, so that "ask, then wait for the event" has no window:
:meth:`AsyncClient.wait_round` notes the serial before it asks.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Coroutine, TypeVar

import numpy as np

from vballoon.control.models import BalloonInfo, ExportInfo, GuestStats, RoundInfo
from vballoon.errors import VballoonError

__all__ = ["AsyncClient", "BalloonInfo", "Client", "Event", "ExportInfo", "GuestStats",
           "QMPCommandError", "QMPConnectionError", "RoundInfo"]

MAX_REPLY = 64 << 20          # bytes of one reply line (65536 ranges take about 3 MiB)
EVENT_HISTORY = 1024          # events kept for wait_event()/wait_round()
RANGES_PER_QUERY = 1 << 16    # the server's maximum
T = TypeVar("T")


class QMPConnectionError(VballoonError):
    """The control socket could not be reached, went away, or spoke something else than QMP."""


class QMPCommandError(VballoonError):
    """A command failed.  ``error_class`` is QMP's class (``GenericError``,
    ``CommandNotFound``, ``DeviceNotActive``), ``desc`` its text, ``command`` the command."""

    def __init__(self, error_class: str, desc: str, command: str = "") -> None:
        super().__init__(error_class, desc)
        self.error_class, self.desc, self.command = error_class, desc, command


# -- typed replies (one home: vballoon.control.models) ----------------------------------------

@dataclass(frozen=True)
class Event:
    """An asynchronous event; ``timestamp`` is the server's Unix time."""

    name: str
    data: dict[str, Any]
    timestamp: float
    serial: int


# -- the async core -----------------------------------------------------------------------------

class AsyncClient:
    """One QMP session on the control socket at ``path``.  Use ``async with`` or
    :meth:`connect` / :meth:`close`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.greeting: dict[str, Any] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: deque[Event] = deque(maxlen=EVENT_HISTORY)
        self._serial = 0
        self._news = asyncio.Event()
        self._lost: QMPConnectionError | None = None

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, read the greeting, negotiate capabilities (none).

        :raise QMPConnectionError: the socket cannot be reached or does not speak QMP.
        """
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                self.path, limit=MAX_REPLY)
        except OSError as e:
            raise QMPConnectionError("control-connect", f"cannot connect to {self.path}: "
                                     f"{e.strerror or e}") from None
        try:
            greeting = await self._read_message()
            if not isinstance(greeting.get("QMP"), dict):
                raise QMPConnectionError("control-protocol", f"{self.path} did not greet with "
                                         f"QMP: {greeting!r:.200}")
            self.greeting = greeting["QMP"]
            self._task = asyncio.ensure_future(self._read_loop())
            await self.execute("qmp_capabilities")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Disconnect; commands still waiting fail with QMPConnectionError."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._fail_pending(QMPConnectionError("control-closed", "the client was closed"))
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
            self._writer = None

    @property
    def version(self) -> dict[str, Any]:
        """The server's VersionInfo, from the greeting."""
        return dict(self.greeting["version"]) if self.greeting else {}

    # -- the session ----------------------------------------------------------------------------

    async def _read_message(self) -> dict[str, Any]:
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise QMPConnectionError("control-protocol", "a reply longer than "
                                     f"{MAX_REPLY} bytes") from None
        except OSError as e:
            raise QMPConnectionError("control-closed", f"{self.path}: {e}") from None
        if not line:
            raise QMPConnectionError("control-closed", f"{self.path} closed the connection")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QMPConnectionError("control-protocol", f"not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise QMPConnectionError("control-protocol", f"not a JSON object: {line[:200]!r}")
        return msg

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await self._read_message()
                if "event" in msg:
                    self._serial += 1
                    ts = msg.get("timestamp", {})
                    self._events.append(Event(msg["event"], msg.get("data", {}),
                                              ts.get("seconds", 0) + ts.get("microseconds", 0)
                                              / 1e6, self._serial))
                    self._news.set()
                    self._news = asyncio.Event()
                    continue
                fut = self._pending.pop(msg.get("id"), None)   # type: ignore[arg-type]
                if fut is not None and not fut.done():          # qmp-spec: drop unknown ids
                    fut.set_result(msg)
        except QMPConnectionError as e:
            self._fail_pending(e)

    def _fail_pending(self, e: QMPConnectionError) -> None:
        self._lost = self._lost or e
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(e)
        self._pending.clear()
        self._news.set()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command`` and return its ``return`` value.

        :raise QMPCommandError: the server answered with an error.
        :raise QMPConnectionError: the connection is gone.
        """
        if self._lost is not None or self._writer is None:
            raise self._lost or QMPConnectionError("control-closed", "not connected")
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        self._writer.write(json.dumps(msg).encode() + b"\n")
        reply = await fut
        if "error" in reply:
            err = reply["error"]
            raise QMPCommandError(err.get("class", "GenericError"), err.get("desc", ""), command)
        return reply.get("return")

    # -- events -----------------------------------------------------------------------------

    @property
    def event_serial(self) -> int:
        """The serial number of the last event received (0: none yet)."""
        return self._serial

    async def wait_event(self, name: str | None = None, *, after: int | None = None,
                         match: Callable[[Event], bool] | None = None,
                         timeout: float | None = None) -> Event:
        """The first event named ``name`` (any if None) that satisfies ``match``, with a serial
        above ``after`` (default: from now on).  Events already received count, so note
        :attr:`event_serial` before the action that causes the event.

        :raise TimeoutError: none came within ``timeout`` seconds.
        :raise QMPConnectionError: the connection is gone.
        """
        after = self._serial if after is None else after
        async with asyncio.timeout(timeout):
            while True:
                for ev in self._events:
                    if ev.serial > after and (name is None or ev.name == name) \
                            and (match is None or match(ev)):
                        return ev
                if self._lost is not None:
                    raise self._lost
                await self._news.wait()

    async def events(self, name: str | None = None) -> AsyncIterator[Event]:
        """Events from now on, as they come (until the connection is lost)."""
        after = self._serial
        while True:
            ev = await self.wait_event(name, after=after)
            after = ev.serial
            yield ev

    # -- the commands (protocol/control-socket.md) ---------------------------------------------

    async def commands(self) -> list[str]:
        return [c["name"] for c in await self.execute("query-commands")]

    async def query_version(self) -> dict[str, Any]:
        return dict(await self.execute("query-version"))

    async def balloon(self, value: int) -> None:
        """Ask for a guest of ``value`` bytes (QEMU's ``balloon``)."""
        await self.execute("balloon", {"value": int(value)})

    async def query_balloon(self) -> BalloonInfo:
        return BalloonInfo(**await self.execute("query-balloon"))

    async def guest_stats(self) -> GuestStats:
        d = await self.execute("query-guest-stats")
        return GuestStats(dict(d["stats"]), d["last-update"])

    async def start_round(self, kind: str = "auto", *, wait: bool = False,
                          timeout: float | None = None) -> RoundInfo:
        """Ask the guest for its free pages.  **Start dirty tracking first.**  With ``wait``,
        return once the round ended (QMPCommandError after ``timeout`` seconds)."""
        args: dict[str, Any] = {"kind": kind}
        if wait:
            args["wait"] = True
            if timeout is not None:
                args["timeout"] = timeout
        return RoundInfo.from_qmp(await self.execute("start-free-page-round", args))

    async def query_round(self, id: int | None = None, *, ranges: bool = False,
                          max_ranges: int | None = None,
                          start_pfn: int | None = None) -> RoundInfo:
        """A round (default: the latest); with ``ranges``, a page of its free ranges."""
        args: dict[str, Any] = {}
        for key, value in (("id", id), ("max-ranges", max_ranges), ("start-pfn", start_pfn)):
            if value is not None:
                args[key] = value
        if ranges:
            args["ranges"] = True
        return RoundInfo.from_qmp(await self.execute("query-free-page-round", args))

    async def wait_round(self, id: int, timeout: float | None = None) -> RoundInfo:
        """Wait until round ``id`` has ended (done or aborted); its final summary.

        :raise TimeoutError: it did not end within ``timeout`` seconds.
        """
        mark = self._serial
        info = await self.query_round(id)
        if not info.active:
            return info
        ev = await self.wait_event("FREE_PAGE_ROUND_COMPLETED", after=mark, timeout=timeout,
                                   match=lambda e: e.data.get("id") == id)
        return RoundInfo.from_qmp(ev.data)

    async def free_ranges(self, id: int | None = None) -> np.ndarray:
        """Every free range of a round (default: the latest) as an ``(n, 2)`` int64 array of
        ``(start_pfn, npages)``, fetched in pages of :data:`RANGES_PER_QUERY`."""
        parts, start = [], 0
        while True:
            info = await self.query_round(id, ranges=True, max_ranges=RANGES_PER_QUERY,
                                          start_pfn=start)
            id = info.id
            assert info.ranges is not None
            parts.append(info.ranges)
            if info.next_pfn is None:
                return np.concatenate(parts) if len(parts) > 1 else parts[0]
            start = info.next_pfn

    async def export(self, filename: str, format: str = "ranges",
                     id: int | None = None) -> ExportInfo:
        """Write a round's map to ``filename`` in the daemon's export directory."""
        args: dict[str, Any] = {"filename": filename, "format": format}
        if id is not None:
            args["id"] = id
        return ExportInfo(**await self.execute("export-free-page-map", args))


# -- the synchronous facade ---------------------------------------------------------------------

class Client:
    """:class:`AsyncClient` for synchronous code: the same methods, blocking.

    The session lives on a private event loop in a daemon thread; :meth:`close` (or the
    ``with`` block's end) stops both.
    """

    def __init__(self, path: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vballoon-client",
                                        daemon=True)
        self._thread.start()
        self._client = AsyncClient(path)
        try:
            self._call(self._client.connect())
        except BaseException:
            self._stop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.close())
        finally:
            self._stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def greeting(self) -> dict[str, Any] | None:
        return self._client.greeting

    @property
    def version(self) -> dict[str, Any]:
        return self._client.version

    @property
    def event_serial(self) -> int:
        return self._client.event_serial

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return self._call(self._client.execute(command, arguments))

    def wait_event(self, name: str | None = None, *, after: int | None = None,
                   match: Callable[[Event], bool] | None = None,
                   timeout: float | None = None) -> Event:
        return self._call(self._client.wait_event(name, after=after, match=match,
                                                  timeout=timeout))

    def commands(self) -> list[str]:
        return self._call(self._client.commands())

    def query_version(self) -> dict[str, Any]:
        return self._call(self._client.query_version())

    def balloon(self, value: int) -> None:
        self._call(self._client.balloon(value))

    def query_balloon(self) -> BalloonInfo:
        return self._call(self._client.query_balloon())

    def guest_stats(self) -> GuestStats:
        return self._call(self._client.guest_stats())

    def start_round(self, kind: str = "auto", *, wait: bool = False,
                    timeout: float | None = None) -> RoundInfo:
        return self._call(self._client.start_round(kind, wait=wait, timeout=timeout))

    def query_round(self, id: int | None = None, *, ranges: bool = False,
                    max_ranges: int | None = None, start_pfn: int | None = None) -> RoundInfo:
        return self._call(self._client.query_round(id, ranges=ranges, max_ranges=max_ranges,
                                                   start_pfn=start_pfn))

    def wait_round(self, id: int, timeout: float | None = None) -> RoundInfo:
        return self._call(self._client.wait_round(id, timeout))

    def free_ranges(self, id: int | None = None) -> np.ndarray:
        return self._call(self._client.free_ranges(id))

    def export(self, filename: str, format: str = "ranges", id: int | None = None) -> ExportInfo:
        return self._call(self._client.export(filename, format, id))
