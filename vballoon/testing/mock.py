"""A device that does nothing on its own and records everything: for tests of the session,
the transport and the daemon that must not depend on what the balloon does."""
from __future__ import annotations

from vballoon.virtio.device import Device
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import Chain, VirtQueue


class MockDevice(Device):
    """``queues`` queues (roles ``q0``, ``q1``, ...), ``config`` bytes of config space, device
    ``feature_bits`` on top of the transport features.  Every chain a queue gets is kept in ``chains[index]``
    and returned at once with ``written`` bytes (0 by default) unless ``hold`` is set."""

    device_id = 0x7F

    def __init__(self, queues: int = 2, *, config: bytes = b"", feature_bits: int = 0) -> None:
        super().__init__()
        self.queues = queues
        self.config = bytearray(config)
        self.feature_bits = feature_bits
        self.hold = False
        self.written = 0
        self.chains: dict[int, list[Chain]] = {i: [] for i in range(queues)}
        self.handlers = {f"q{i}": self._take for i in range(queues)}
        self.calls: list[tuple] = []            # (method name, args...) in call order

    def device_features(self) -> int:
        return self.feature_bits

    def queue_roles(self, features: int) -> list[str]:
        return [f"q{i}" for i in range(self.queues)]

    def set_features(self, acked: int) -> None:
        super().set_features(acked)
        self.calls.append(("set_features", acked))

    def get_config(self) -> bytes:
        return bytes(self.config)

    def set_config(self, offset: int, data: bytes, migration: bool) -> None:
        self.config[offset:offset + len(data)] = data
        self.calls.append(("set_config", offset, bytes(data), migration))

    def queue_started(self, vq: VirtQueue, mem: GuestMemory) -> None:
        self.calls.append(("queue_started", vq.index))

    def queue_stopped(self, vq: VirtQueue) -> None:
        self.calls.append(("queue_stopped", vq.index))

    def _take(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        self.calls.append(("process", vq.index))
        while (chain := vq.pop(mem)) is not None:
            self.chains[vq.index].append(chain)
            if not self.hold:
                vq.push(chain, self.written)
        return False

    def reset(self) -> None:
        super().reset()
        self.calls.append(("reset",))

    def driver_restarted(self) -> None:
        self.calls.append(("driver_restarted",))

    def memory_changed(self, mem: GuestMemory | None) -> None:
        self.calls.append(("memory_changed", mem is not None))
