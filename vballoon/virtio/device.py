"""What a virtio device implements behind the vhost-user session.

The session (``vhost_user.Session``) owns the protocol, the memory table and the rings; a
:class:`Device` only sees virtio: features, config space, and queues that have work.  It never
sees a vhost-user message (rust-vmm's ``VhostUserBackend`` trait is the model).
"""
from __future__ import annotations

from typing import Callable

from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import VirtQueue


class Device:
    """Base class: a device with no queues and no config.  Subclasses override what they need."""

    #: virtio device id (5 for the balloon)
    device_id = 0

    def __init__(self) -> None:
        self.acked_features = 0
        #: set by the session: call to announce a config change to the driver
        self.config_changed: Callable[[], None] = lambda: None
        #: set by the session: call to interrupt the driver on queue ``i`` if it wants it
        self.notify: Callable[[int], None] = lambda i: None

    # -- negotiation --------------------------------------------------------------------

    def features(self) -> int:
        """Virtio feature bits offered (without VHOST_USER_F_PROTOCOL_FEATURES)."""
        return 0

    def max_queues(self) -> int:
        """How many queues the device can have (GET_QUEUE_NUM; QEMU's num_vqs must not exceed it)."""
        return 0

    def set_features(self, acked: int) -> None:
        """The driver's acked features, known at SET_FEATURES (its DRIVER_OK on QEMU)."""
        self.acked_features = acked

    # -- config space -------------------------------------------------------------------

    def get_config(self) -> bytes:
        return b""

    def set_config(self, offset: int, data: bytes, migration: bool) -> None:
        """A driver (or, with ``migration``, a live-migration) write of config space."""

    # -- queues -------------------------------------------------------------------------

    def queue_started(self, vq: VirtQueue, mem: GuestMemory) -> None:
        """Queue ``vq.index`` is enabled and running."""

    def queue_stopped(self, vq: VirtQueue) -> None:
        """Queue ``vq.index`` was stopped (GET_VRING_BASE) or the connection went away.

        Chains the device still held are rewound by the session; forget them here.
        """

    def process(self, vq: VirtQueue, mem: GuestMemory) -> None:
        """Queue ``vq.index`` was kicked: pop and handle what the driver made available.

        A :class:`~vballoon.errors.GuestError` raised here marks the queue broken.
        """

    def reset(self) -> None:
        """The front-end went away or reset the device: drop all driver-side state."""
        self.acked_features = 0

    def driver_restarted(self) -> None:
        """A new driver took the device over (the guest rebooted) without any reset message:
        drop what the previous driver left, keep what the new one already set up."""

    def memory_changed(self, mem: GuestMemory | None) -> None:
        """A new memory table (or none, after a disconnect)."""
