"""What the balloon's parts (one per queue role) may use of the device that composes them.

The parts take a :class:`BalloonContext`, not the :class:`~.device.Balloon` itself, so they
depend on this small surface and the composition depends on them: no part imports the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from vballoon.devices.balloon.rounds import RoundRegistry
from vballoon.fpmap.rounds import Round
from vballoon.virtio.device import DeviceEvent, GuestLog
from vballoon.virtio.memory import GuestMemory


@dataclass
class Counters:
    inflated_pages: int = 0              # pages in the balloon now (by the device's own count)
    reported_bytes: int = 0
    discarded_bytes: int = 0
    discard_calls: int = 0
    hinted_bytes: int = 0


class ConfigView(Protocol):
    """The config-space fields the queue parts read or set."""

    poison_val: int
    cmd_id: int

    def set_cmd_id(self, cmd_id: int) -> None: ...


class BalloonContext(Protocol):
    """The device as its parts see it."""

    mem: GuestMemory | None
    counters: Counters
    rounds: RoundRegistry
    glog: GuestLog
    roles: dict[int, str]
    clock: Callable[[], float]
    notify: Callable[[int], None]
    config_changed: Callable[[], None]

    @property
    def config(self) -> ConfigView: ...

    def has(self, bit: int) -> bool: ...

    def emit(self, event: DeviceEvent) -> None: ...

    def discard(self, mem: GuestMemory, runs: tuple[np.ndarray, np.ndarray]) -> int: ...

    def round_ended(self, r: Round) -> None: ...
