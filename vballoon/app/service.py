"""The balloon's service: the API the control socket serves (QEMU's names and units where QEMU
has the command), over a :class:`~vballoon.devices.balloon.Balloon`.

It implements :class:`vballoon.control.models.ControlService`.  It turns the device's typed
events into QMP events (``BALLOON_CHANGE``, ``FREE_PAGE_ROUND_COMPLETED``) for its listeners,
and wakes the commands that wait for a round.  It holds no socket and no timer: the daemon
(:class:`vballoon.app.daemon.Daemon`) serves the device and gives the service its events.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from vballoon.control.models import (BalloonInfo, ExportInfo, GuestStats, Listener,
                                     RoundInfo)
from vballoon.devices.balloon import ActualChanged, Balloon, RoundEnded
from vballoon.devices.balloon.device import PAGE
from vballoon.errors import ConfigError, DeviceNotActive
from vballoon.fpmap import Round
from vballoon.fpmap.export import write_export
from vballoon.virtio.device import DeviceEvent

log = logging.getLogger(__name__)


class BalloonService:
    """``device``'s control API.  ``is_active``: a guest driver is attached (the daemon knows:
    a front-end is connected and the driver set its features)."""

    def __init__(self, device: Balloon, *, export_dir: str | None = None,
                 is_active: Callable[[], bool] = lambda: True) -> None:
        self.device = device
        self.export_dir = export_dir
        self._is_active = is_active
        self._listeners: list[Listener] = []
        self._round_waiters: dict[int, list[asyncio.Future[Round]]] = {}

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Give a QMP event to every listener; a failing listener is logged, not fatal."""
        for listener in list(self._listeners):
            try:
                listener(event, data)
            except Exception:
                log.exception("event listener %r failed on %s", listener, event)

    def handle_event(self, event: DeviceEvent) -> None:
        """The device's events, as QMP events (the daemon calls this from its sink)."""
        if isinstance(event, ActualChanged):
            self.emit("BALLOON_CHANGE", BalloonInfo(self.logical_size()).to_qmp())
        elif isinstance(event, RoundEnded):
            r = event.round
            self.emit("FREE_PAGE_ROUND_COMPLETED", RoundInfo.from_round(r).to_qmp())
            for f in self._round_waiters.pop(r.id, []):
                if not f.done():
                    f.set_result(r)

    def close(self) -> None:
        for waiters in self._round_waiters.values():
            for f in waiters:
                if not f.done():
                    f.cancel()
        self._round_waiters.clear()

    @property
    def waiting(self) -> int:
        """Commands waiting for a round to end."""
        return sum(len(w) for w in self._round_waiters.values())

    # -- the API -----------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._is_active() and self.device.mem is not None

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
        if value > self.ram_bytes():
            log.info("balloon: %d bytes asked for, above the guest's RAM (%d bytes): the balloon "
                     "is emptied (a guest cannot grow past its RAM; QEMU's meaning)", value,
                     self.ram_bytes())
        self.device.set_target(max(0, self.ram_bytes() - value) // PAGE)

    def query_balloon(self) -> BalloonInfo:
        self._require_active()
        return BalloonInfo(self.logical_size())

    def guest_stats(self) -> GuestStats:
        """The latest stats in the shape of QEMU's ``guest-stats`` QOM property."""
        self._require_active()
        st = self.device.stats
        return GuestStats({f"stat-{k}": v for k, v in st.values.items()}, int(st.updated or 0))

    def start_round(self, kind: str = "auto") -> RoundInfo:
        """Ask the guest for a map of its free pages.  Start dirty tracking *before* this."""
        self._require_active()
        return RoundInfo.from_round(self.device.start_round(kind))

    def get_round(self, round_id: int | None = None) -> Round:
        """Round ``round_id`` (default: the latest).  :raise ConfigError: ``round-unknown``."""
        return self.device.rounds.get(round_id)

    async def wait_round(self, round_id: int, timeout: float | None = None) -> RoundInfo:
        """Wait until round ``round_id`` has ended; its description then (even if it has been
        evicted from the kept rounds meanwhile).  :raise TimeoutError: not within ``timeout``."""
        r = self.get_round(round_id)
        if r.active:
            fut: asyncio.Future[Round] = asyncio.get_running_loop().create_future()
            self._round_waiters.setdefault(round_id, []).append(fut)
            try:
                await asyncio.wait_for(fut, timeout)
            finally:
                waiters = self._round_waiters.get(round_id, [])
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    self._round_waiters.pop(round_id, None)
        return RoundInfo.from_round(r)

    def round_info(self, round_id: int | None = None) -> RoundInfo:
        return RoundInfo.from_round(self.get_round(round_id))

    def query_round(self, round_id: int | None = None, *, ranges: bool = False,
                    max_ranges: int = 1024, start_pfn: int = 0) -> RoundInfo:
        """A round's description; with ``ranges``, one page of its free ranges: at most
        ``max_ranges`` from ``start_pfn`` (0 to max_pfn, inclusive) on."""
        r = self.get_round(round_id)
        if not ranges:
            return RoundInfo.from_round(r)
        m = r.map
        if not 0 <= start_pfn <= m.max_pfn:
            raise ConfigError("round-start-pfn", f"Parameter 'start-pfn' expects a pfn from 0 "
                              f"to {m.max_pfn}")
        part, count, next_pfn = m.range_page(start_pfn, max_ranges)
        return RoundInfo.from_round(r, ranges=part, range_count=count, next_pfn=next_pfn)

    async def export_map(self, round_id: int | None, filename: str, fmt: str) -> ExportInfo:
        """Write a round's map to ``filename`` inside the export directory."""
        if self.export_dir is None:
            raise ConfigError("export-no-dir", "the daemon has no export directory (start it "
                              "with --export-dir DIR)")
        r = self.get_round(round_id)
        write = (self.export_dir, filename, fmt)
        ballooned = self.device.ballooned_bitmap(r.map.max_pfn) if fmt == "bitmap" else None
        if r.active:        # the loop still merges into this map: write it here, in the loop
            res = write_export(r, *write, ballooned=ballooned)
        else:
            # A finished map no longer changes: write it (and fsync) off the loop, so a big
            # export does not hold up the vhost-user session.  Coverage is written lazily;
            # settle it here first.
            r.map.covered_pages()
            res = await asyncio.to_thread(write_export, r, *write, ballooned=ballooned)
        return ExportInfo(r.id, res.path, res.format, res.bytes, res.ranges)
