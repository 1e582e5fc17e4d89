"""The typed service boundary: what the control socket serves, and the shapes of its replies.

Every reply and event payload of ``protocol/control-socket.md`` that has a shape is a frozen
dataclass here, built in one place and turned into QMP (``to_qmp``) or read back from it
(``from_qmp``) by the same class: the daemon's service, the control server, the client and
``vballoon ctl`` all use these, so the shape cannot drift between them.

:class:`ControlService` is the protocol the control server is typed against; the balloon's
service (:class:`vballoon.app.service.BalloonService`) implements it.  This module imports
nothing above it (no ``app``), and nothing that needs a device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from vballoon.units import FRAME

PAGE_SIZE = FRAME       # the unit of every pfn and page count of the control socket


@dataclass(frozen=True)
class BalloonInfo:
    """``query-balloon``: the guest's memory size after ballooning, in bytes."""

    actual: int

    def to_qmp(self) -> dict[str, Any]:
        return {"actual": self.actual}


@dataclass(frozen=True)
class GuestStats:
    """``query-guest-stats``: ``stats`` by QEMU's names ("stat-free-memory", ...), and the
    Unix time they were last updated (0: never)."""

    stats: dict[str, int]
    last_update: int

    def to_qmp(self) -> dict[str, Any]:
        return {"stats": dict(self.stats), "last-update": self.last_update}


@dataclass(frozen=True)
class RoundInfo:
    """A free-page round (``start-free-page-round``, ``query-free-page-round``, the
    ``FREE_PAGE_ROUND_COMPLETED`` event).  ``ranges``: an ``(n, 2)`` int64 array of
    ``(start_pfn, npages)`` when ranges were asked for, else None; ``dropped``: chunks of this
    round dropped, by rule (only chunks that carried its id), when there were any."""

    id: int
    kind: str
    state: str
    complete: bool
    coverage: float
    ram_pages: int
    covered_pages: int
    free_pages: int
    free_bytes: int
    requested_at: float
    finished_at: float | None
    duration: float | None
    abort_reason: str | None = None
    range_count: int | None = None
    ranges: np.ndarray | None = field(default=None, compare=False)
    next_pfn: int | None = None
    dropped: dict[str, int] | None = None

    @property
    def active(self) -> bool:
        """The guest may still add to the round's map."""
        return self.state in ("requested", "receiving")

    @classmethod
    def from_round(cls, r: Any, *, ranges: np.ndarray | None = None,
                   range_count: int | None = None, next_pfn: int | None = None) -> "RoundInfo":
        """The description of round ``r`` (a :class:`vballoon.fpmap.Round`) now."""
        m = r.map
        end = r.finished_at
        free = m.free_pages()
        dropped = {v.value: n for v, n in sorted(r.dropped.items(), key=lambda x: x[0].value)
                   if n} or None
        return cls(r.id, r.kind, r.state.value, r.complete, m.coverage(), m.ram_pages,
                   m.covered_pages(), free, free * PAGE_SIZE, r.requested_at, end,
                   None if end is None else end - r.requested_at, r.abort_reason or None,
                   range_count, ranges, next_pfn, dropped)

    def to_qmp(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "kind": self.kind, "state": self.state, "complete": self.complete,
            "coverage": self.coverage, "ram-pages": self.ram_pages,
            "covered-pages": self.covered_pages, "free-pages": self.free_pages,
            "free-bytes": self.free_bytes, "requested-at": self.requested_at,
            "finished-at": self.finished_at, "duration": self.duration,
        }
        if self.abort_reason:
            d["abort-reason"] = self.abort_reason
        if self.dropped:
            d["dropped"] = dict(self.dropped)
        if self.ranges is not None:
            d["range-count"] = self.range_count
            d["ranges"] = [{"start-pfn": a, "pages": n} for a, n in self.ranges.tolist()]
            d["next-pfn"] = self.next_pfn
        return d

    @classmethod
    def from_qmp(cls, d: dict[str, Any]) -> "RoundInfo":
        ranges = None
        if "ranges" in d:
            ranges = np.array([(r["start-pfn"], r["pages"]) for r in d["ranges"]],
                              dtype=np.int64).reshape(-1, 2)
        return cls(d["id"], d["kind"], d["state"], d["complete"], d["coverage"], d["ram-pages"],
                   d["covered-pages"], d["free-pages"], d["free-bytes"], d["requested-at"],
                   d["finished-at"], d["duration"], d.get("abort-reason"), d.get("range-count"),
                   ranges, d.get("next-pfn"), d.get("dropped"))


@dataclass(frozen=True)
class ExportInfo:
    """``export-free-page-map``: the file written (read it with
    :func:`vballoon.fpmap.export.read_export`)."""

    id: int
    path: str
    format: str
    bytes: int
    ranges: int

    def to_qmp(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "format": self.format, "bytes": self.bytes,
                "ranges": self.ranges}


#: an event listener: (QMP event name, data)
Listener = Callable[[str, dict[str, Any]], None]


class ControlService(Protocol):
    """What the control server serves.  Methods raise :class:`vballoon.errors.VballoonError`
    (``DeviceNotActive`` when no driver is attached) for the server to answer as QMP errors."""

    def subscribe(self, listener: Listener) -> None: ...

    def unsubscribe(self, listener: Listener) -> None: ...

    def balloon(self, value: int) -> None: ...

    def query_balloon(self) -> BalloonInfo: ...

    def guest_stats(self) -> GuestStats: ...

    def start_round(self, kind: str = "auto") -> RoundInfo: ...

    async def wait_round(self, round_id: int, timeout: float | None = None) -> RoundInfo: ...

    def query_round(self, round_id: int | None = None, *, ranges: bool = False,
                    max_ranges: int = 1024, start_pfn: int = 0) -> RoundInfo: ...

    async def export_map(self, round_id: int | None, filename: str,
                         fmt: str) -> ExportInfo: ...
