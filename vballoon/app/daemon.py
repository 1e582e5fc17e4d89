"""The daemon: one balloon device served on a vhost-user socket, its timers, and the API the
control socket exposes (QEMU's names and units where QEMU has the command).

Everything asynchronous that is not the vhost-user transport lives here or in the control
server: the stats timer, the round timer, signal handling.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any, Callable, Iterable

from vballoon.devices.balloon.device import PAGE, Balloon, HintRound, round_kind, round_state
from vballoon.errors import ConfigError, DeviceNotActive
from vballoon.fpmap import Round
from vballoon.vhost.transport import Server

log = logging.getLogger(__name__)

TICK = 1.0      # seconds between checks of round time-outs


class Daemon:
    def __init__(self, socket_path: str, *, features: Iterable[str] | None = None,
                 stats_interval: float = 5.0, control_path: str | None = None,
                 export_dir: str | None = None) -> None:
        self.device = Balloon(features)
        self.socket_path = socket_path
        self.control_path = control_path
        self.export_dir = export_dir
        self.stats_interval = stats_interval
        self.server: Server | None = None
        self.control: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._round_waiters: dict[int, list[asyncio.Future[Any]]] = {}
        #: event listeners: called with (QMP event name, data dict)
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.device.on_change = self._on_change

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.server = Server(self.socket_path, self.device)
        self._tasks.append(self.server.start())
        self._tasks.append(asyncio.ensure_future(self._timer(TICK, self._tick)))
        if self.stats_interval > 0:
            self._tasks.append(asyncio.ensure_future(
                self._timer(self.stats_interval, self.device.request_stats)))
        if self.control_path is not None:
            from vballoon.control.server import ControlServer
            self.control = ControlServer(self.control_path, self)
            await self.control.start()
        log.info("listening on %s (queues: %d, features offered: %#x)", self.socket_path,
                 self.device.max_queues(), self.device.features())

    async def _timer(self, period: float, fn: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(period)
            if self.server is not None and self.server.connected:
                fn()

    def _tick(self) -> None:
        self.device.tick(time.time())

    def stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        if self.control is not None:
            await self.control.close()
            self.control = None
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
        for waiters in self._round_waiters.values():
            for f in waiters:
                if not f.done():
                    f.cancel()

    # -- events ----------------------------------------------------------------------------

    def emit(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener(event, data)

    def _on_change(self, what: str, *args: Any) -> None:
        if what == "actual":
            self.emit("BALLOON_CHANGE", {"actual": self.logical_size()})
        elif what == "round":
            r = args[0]
            self.emit("FREE_PAGE_ROUND_COMPLETED", self.round_info(r.id))
            for f in self._round_waiters.pop(r.id, []):
                if not f.done():
                    f.set_result(r)

    # -- the API (QEMU's names and units where QEMU has them) ---------------------------------

    @property
    def active(self) -> bool:
        """A guest driver is attached: a front-end is connected and the driver set features."""
        return self.server is not None and self.server.driver_attached \
            and self.device.mem is not None

    def _require_active(self) -> None:
        if not self.active:
            raise DeviceNotActive()

    def ram_bytes(self) -> int:
        return self.device.ram_pages * PAGE

    def logical_size(self) -> int:
        """QEMU's ``actual``: the guest's memory size in bytes after ballooning."""
        return self.ram_bytes() - self.device.actual * PAGE

    def balloon(self, value: int) -> None:
        """QEMU's ``balloon``: ask for a guest of ``value`` bytes (rounded down to pages)."""
        self._require_active()
        if value <= 0:
            raise ConfigError("balloon-value", "Parameter 'value' expects a size")
        target = max(0, self.ram_bytes() - value) // PAGE
        self.device.set_target(target)

    def query_balloon(self) -> dict[str, Any]:
        self._require_active()
        return {"actual": self.logical_size()}

    def guest_stats(self) -> dict[str, Any]:
        """The latest stats in the shape of QEMU's ``guest-stats`` QOM property."""
        self._require_active()
        st = self.device.stats
        return {"stats": {f"stat-{k}": v for k, v in st.values.items()},
                "last-update": int(st.updated or 0)}

    def start_round(self, kind: str = "auto") -> Round | HintRound:
        """Ask the guest for a map of its free pages.  Start dirty tracking *before* this."""
        self._require_active()
        return self.device.start_round(kind)

    async def wait_round(self, round_id: int, timeout: float | None = None) -> Round | HintRound:
        r = self.get_round(round_id)
        if r.active:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._round_waiters.setdefault(round_id, []).append(fut)
            try:
                await asyncio.wait_for(fut, timeout)
            finally:
                waiters = self._round_waiters.get(round_id, [])
                if fut in waiters:
                    waiters.remove(fut)
        return r

    def get_round(self, round_id: int | None = None) -> Round | HintRound:
        rounds = self.device.rounds
        if round_id is None:
            if not rounds:
                raise ConfigError("round-unknown", "no free page round has been started")
            return rounds[next(reversed(rounds))]
        if round_id not in rounds:
            raise ConfigError("round-unknown", f"no round {round_id} (known: "
                              f"{', '.join(map(str, rounds)) or 'none'})")
        return rounds[round_id]

    def round_info(self, round_id: int | None = None, *, ranges: bool = False,
                   max_ranges: int = 1024) -> dict[str, Any]:
        """A round's summary; with ``ranges``, its first ``max_ranges`` free ranges."""
        r = self.get_round(round_id)
        m = r.map
        end = r.finished_at
        info: dict[str, Any] = {
            "id": r.id, "kind": round_kind(r), "state": round_state(r),
            "complete": r.complete, "coverage": m.coverage(),
            "ram-pages": m.ram_pages, "covered-pages": m.covered_pages(),
            "free-pages": m.free_pages(), "free-bytes": m.free_pages() * PAGE,
            "requested-at": r.requested_at, "finished-at": end,
            "duration": None if end is None else end - r.requested_at,
        }
        if r.abort_reason:
            info["abort-reason"] = r.abort_reason
        if ranges:
            rs = m.ranges()
            info["range-count"] = int(rs.shape[0])
            info["ranges"] = [{"start-pfn": int(a), "pages": int(n)} for a, n in rs[:max_ranges]]
        return info


async def serve(socket_path: str, **kw: Any) -> None:
    """Run until SIGTERM or SIGINT; the sockets are removed on the way out."""
    daemon = Daemon(socket_path, **kw)
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
