"""The balloon's typed events, given to the device's one sink (``Balloon.on_change``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vballoon.fpmap.rounds import Round
from vballoon.virtio.device import DeviceEvent


@dataclass
class Stats:
    """The driver's latest statistics, by QEMU's names (``free-memory``, ...)."""

    values: dict[str, int] = field(default_factory=dict)
    updated: float | None = None         # wall-clock time of the last update
    count: int = 0


@dataclass(frozen=True)
class ActualChanged(DeviceEvent):
    """The driver wrote a new ``actual`` (pages in the balloon, by the driver's count)."""

    actual: int


@dataclass(frozen=True)
class StatsUpdated(DeviceEvent):
    """The driver sent statistics."""

    stats: Stats


@dataclass(frozen=True)
class RoundStarted(DeviceEvent):
    """A free-page round was requested (its deadline is new: the daemon re-arms its timer)."""

    round: Round


@dataclass(frozen=True)
class RoundEnded(DeviceEvent):
    """A free-page round ended (done or aborted).  Given exactly once per round."""

    round: Round
