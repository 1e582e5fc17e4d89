"""The device kit: what a virtio device implements behind the vhost-user session.

The session (:class:`vballoon.vhost.session.Session`) owns the protocol, the memory table and
the rings; a :class:`Device` only sees virtio: features, config space, and queues that have
work.  It never sees a vhost-user message (rust-vmm's ``VhostUserBackend`` trait is the model).

A device declares

- its **device features** (:meth:`Device.device_features`); the transport features every
  device of this back-end supports (VERSION_1, EVENT_IDX, INDIRECT_DESC: :data:`TRANSPORT_FEATURES`)
  are added by :meth:`Device.features`;
- its **queues** by role (:meth:`Device.queue_roles` for the negotiated features) and a
  handler per role (:attr:`Device.handlers`): :meth:`Device.process` dispatches from that
  table.  A handler handles at most :data:`CHAINS_PER_CALL` chains and returns True when it
  stopped at that bound with work left (the transport calls again later, after the other
  queues and clients had their turn);
- **typed events** (subclasses of :class:`DeviceEvent`) given to one sink, :attr:`Device.on_change`,
  which the daemon sets;
- **when it next needs time**: :meth:`Device.next_deadline` (a time of :attr:`Device.clock`, or
  None) and :meth:`Device.handle_timer` (aioquic's ``get_timer``/``handle_timer``): the daemon
  arms one timer at the earliest deadline, so an idle device costs no wake-ups.

Everything here is synchronous: no event loop, no I/O.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from vballoon.ratelimit import RuleRateLimit
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import VirtQueue
from vballoon.wire import C

log = logging.getLogger(__name__)

TRANSPORT_FEATURES = (1 << C.VIRTIO_F_VERSION_1 | 1 << C.VIRTIO_RING_F_EVENT_IDX
                      | 1 << C.VIRTIO_RING_F_INDIRECT_DESC)
CHAINS_PER_CALL = 128      # chains one process() call handles before it yields
GUEST_LOG_BURST = 10       # guest-error messages of one rule logged at first, then ...
GUEST_LOG_INTERVAL = 1.0   # ... one per this many seconds, with a count of those dropped

#: a queue handler: (queue, guest memory) -> True if it stopped with work left
Handler = Callable[[VirtQueue, GuestMemory], bool]


@dataclass(frozen=True)
class DeviceEvent:
    """Base of the events a device gives its sink (:attr:`Device.on_change`)."""


class GuestLog:
    """Guest errors logged as ``rule: message`` lines, rate-limited per rule (the same
    :class:`~vballoon.ratelimit.RuleRateLimit` the vhost layers use): a guest that repeats a
    mistake in a loop costs a few lines, then one line a second saying how many were dropped."""

    def __init__(self, logger: logging.Logger, *, burst: int = GUEST_LOG_BURST,
                 interval: float = GUEST_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.limit = RuleRateLimit(burst, interval, clock=clock)

    @property
    def suppressed(self) -> int:
        """Messages not logged so far, all rules."""
        return self.limit.suppressed

    def __call__(self, level: int, rule: str, msg: str, *args: object) -> None:
        dropped = self.limit.admit((self.logger.name, rule))
        if dropped is None:
            return
        more = f" [{dropped} more like this suppressed]" if dropped else ""
        self.logger.log(level, f"{rule}: {msg}{more}", *args)

    def error(self, rule: str, msg: str, *args: object) -> None:
        self(logging.ERROR, rule, msg, *args)

    def warning(self, rule: str, msg: str, *args: object) -> None:
        self(logging.WARNING, rule, msg, *args)


class ChainBatch:
    """Iterate over at most ``limit`` chains of a queue; ``more`` afterwards says whether the
    bound stopped the loop (the handler's return value)."""

    def __init__(self, vq: VirtQueue, mem: GuestMemory, limit: int = CHAINS_PER_CALL) -> None:
        self.vq, self.mem, self.limit, self.more = vq, mem, limit, False

    def __iter__(self):
        for _ in range(self.limit):
            chain = self.vq.pop(self.mem)
            if chain is None:
                return
            yield chain
        self.more = True


class Device:
    """Base class: a device with no queues and no config.  Subclasses override what they need."""

    #: virtio device id (5 for the balloon)
    device_id = 0
    #: set by a transport that calls :meth:`process` again (after other work) when it
    #: returned True; until then :meth:`process` itself loops until the queue is drained
    transport_reschedules = False

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.acked_features = 0
        self.clock = clock
        #: queue index -> role, for the negotiated features (set at SET_FEATURES)
        self.roles: dict[int, str] = {}
        #: role -> handler; :meth:`process` dispatches from it
        self.handlers: dict[str, Handler] = {}
        #: set by the session: call to announce a config change to the driver
        self.config_changed: Callable[[], None] = lambda: None
        #: set by the session: call to interrupt the driver on queue ``i`` if it wants it
        self.notify: Callable[[int], None] = lambda i: None
        #: the sink of the device's events (:class:`DeviceEvent`); the daemon sets it
        self.on_change: Callable[[DeviceEvent], None] = lambda event: None

    def emit(self, event: DeviceEvent) -> None:
        """Give ``event`` to the sink.  A failing sink is logged; the device goes on."""
        try:
            self.on_change(event)
        except Exception:
            log.exception("the event sink failed on %r", event)

    # -- negotiation --------------------------------------------------------------------

    def device_features(self) -> int:
        """The device-specific feature bits offered."""
        return 0

    def features(self) -> int:
        """Virtio feature bits offered (without VHOST_USER_F_PROTOCOL_FEATURES): the device's
        and :data:`TRANSPORT_FEATURES`."""
        return self.device_features() | TRANSPORT_FEATURES

    def queue_roles(self, features: int) -> list[str]:
        """The device's queues in index order, for the negotiated ``features``."""
        return []

    def max_queues(self) -> int:
        """How many queues the device can have (GET_QUEUE_NUM; QEMU's num_vqs must not exceed it)."""
        return len(self.queue_roles(self.features()))

    def set_features(self, acked: int) -> None:
        """The driver's acked features, known at SET_FEATURES (its DRIVER_OK on QEMU)."""
        self.acked_features = acked
        self.roles = dict(enumerate(self.queue_roles(acked)))

    def has(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

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

    def process(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        """Queue ``vq.index`` was kicked: pop and handle what the driver made available, at
        most :data:`CHAINS_PER_CALL` chains.  True: stopped at that bound, call again.

        A :class:`~vballoon.errors.GuestError` raised here marks the queue broken.
        """
        from vballoon.errors import GuestError
        role = self.roles.get(vq.index)
        handler = None if role is None else self.handlers.get(role)
        if handler is None:
            raise GuestError("queue-unused", f"queue {vq.index} has no role with the "
                             f"negotiated features {self.acked_features:#x}")
        more = bool(handler(vq, mem))
        while more and not self.transport_reschedules:
            more = bool(handler(vq, mem))
        return more

    def reset(self) -> None:
        """The front-end went away or reset the device: drop all driver-side state."""
        self.acked_features = 0
        self.roles = {}

    def driver_restarted(self) -> None:
        """A new driver took the device over (the guest rebooted) without any reset message:
        drop what the previous driver left, keep what the new one already set up."""

    def memory_changed(self, mem: GuestMemory | None) -> None:
        """A new memory table (or none, after a disconnect)."""

    # -- time ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When (a time of :attr:`clock`) :meth:`handle_timer` must next be called; None: the
        device needs no time now."""
        return None

    def handle_timer(self, now: float) -> None:
        """Time passed: apply the time-based rules due at ``now``."""
