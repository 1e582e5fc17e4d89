"""The daemon: one balloon device served on a vhost-user socket, plus its timers.

Everything asynchronous that is not the vhost-user transport lives here: the stats timer, the
signal handlers, and (with ``control_path``) the control socket.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Iterable

from .balloon import Balloon
from .transport import Server

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, socket_path: str, *, features: Iterable[str] | None = None,
                 stats_interval: float = 5.0) -> None:
        self.device = Balloon(features)
        self.socket_path = socket_path
        self.stats_interval = stats_interval
        self.server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        self.server = Server(self.socket_path, self.device)
        self._tasks.append(self.server.start())
        if self.stats_interval > 0:
            self._tasks.append(asyncio.ensure_future(self._stats_timer()))
        log.info("listening on %s (queues: %d, features offered: %#x)", self.socket_path,
                 self.device.max_queues(), self.device.features())

    async def _stats_timer(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            conn = self.server.connection if self.server else None
            if conn is not None:
                self.device.request_stats()

    def stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self.server is not None:
            await self.server.close()
            self.server = None


async def serve(socket_path: str, **kw: object) -> None:
    """Run until SIGTERM or SIGINT; the socket is removed on the way out."""
    daemon = Daemon(socket_path, **kw)   # type: ignore[arg-type]
    await daemon.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    print(f"vballoon: ready on {socket_path}", flush=True)
    try:
        await daemon.wait()
        log.info("stopping")
    finally:
        await daemon.close()
