"""A balloon without a socket: the device, guest RAM in a memfd, and in-memory split rings
driven by the simulated driver's :class:`~vballoon.sim.driver.DriverQueue` (its own ring
layout, from the spec).  ``from balloonrig import Rig`` (a unique module name)."""
from __future__ import annotations

import os
from typing import Iterable

from vballoon.devices.balloon import Balloon
from vballoon.sim.driver import DriverQueue, GuestRam
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import VirtQueue
from vballoon.wire import C

MiB = 1 << 20
PAGE = 4096


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    """``Balloon(features)`` with ``acked`` negotiated (default: all offered) over ``layout``."""

    def __init__(self, layout: Iterable[tuple[int, int]] = ((0, 64 * MiB),), *,
                 features: Iterable[str] | None = None, acked: int | None = None,
                 queue_size: int = 64, stats_interval: float = 0.0,
                 device: Balloon | None = None) -> None:
        self.clock = Clock()
        self.ram = GuestRam(list(layout))
        self.mem = GuestMemory.map(self.ram.regions, [os.dup(self.ram.fd) for _ in self.ram.regions])
        self.dev = device or Balloon(features, stats_interval=stats_interval, clock=self.clock)
        self.dev.clock = self.clock
        self.events: list = []
        self.notified: list[int] = []
        self.config_changes = 0
        self.dev.on_change = self.events.append
        self.dev.notify = self.notified.append
        self.dev.config_changed = self._config_changed
        self.dev.set_features(self.dev.features() if acked is None else acked)
        self.dev.memory_changed(self.mem)
        event_idx = self.dev.has(C.VIRTIO_RING_F_EVENT_IDX)
        self.driver: dict[str, DriverQueue] = {}
        self.vqs: dict[str, VirtQueue] = {}
        for i, role in self.dev.roles.items():
            dq = DriverQueue(self.ram, i, queue_size, event_idx=event_idx)
            vq = VirtQueue(i)
            vq.num, vq.event_idx = queue_size, event_idx
            vq.indirect = self.dev.has(C.VIRTIO_RING_F_INDIRECT_DESC)
            vq.desc_addr, vq.avail_addr, vq.used_addr = (self.ram.uva(dq.desc),
                                                         self.ram.uva(dq.avail),
                                                         self.ram.uva(dq.used))
            vq.attach(self.mem)
            self.driver[role], self.vqs[role] = dq, vq

    def _config_changed(self) -> None:
        self.config_changes += 1

    def run(self, role: str) -> bool:
        """One kick of queue ``role``: process() as the session calls it."""
        return self.dev.process(self.vqs[role], self.mem)

    def close(self) -> None:
        self.dev.reset()
        self.dev.memory_changed(None)
        for vq in self.vqs.values():
            vq.detach()
        for dq in self.driver.values():
            dq.close()
        self.mem.close()
        self.ram.close()

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
