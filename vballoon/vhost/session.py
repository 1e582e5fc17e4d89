"""The vhost-user session: a sans-IO state machine, back-end side (QEMU docs/interop/vhost-user.rst).

``Session.handle(Message)`` takes one front-end request with its fds and returns the reply bytes
(or None); everything else it wants done is emitted as a typed action through the ``emit``
callback given at construction: :class:`Watch` / :class:`Unwatch` a kick eventfd,
:class:`Signal` a call or err eventfd, :class:`SetBackendChannel` (the backend fd passes to the
transport), :class:`SendBackend`, :class:`CloseFds`, :class:`Resume` a queue with work left,
:class:`Close` the connection.  The session does no I/O itself: it imports neither ``os`` nor
``mmap``; the transport (:mod:`vballoon.vhost.transport`) carries the actions out, and the two
pieces of I/O the session needs answered are injected: ``map_memory`` (a memory table and its
fds to a :class:`GuestMemory`) and ``check_fd`` (is this fd an eventfd / a socket; made
non-blocking).  Tests collect the actions.  Every fd the session was given is released exactly
once, through a ``CloseFds`` or ``SetBackendChannel`` action or by the memory table.

Error policy, by who must be told:
* A framing error (version bits, REPLY bit, oversized ``size``) cannot be resynchronised:
  :meth:`Session.check_header` raises and the connection is closed.
* A bad request whose stream is still in sync gets a logged error naming the rule, then an error
  reply where the front-end waits for one (a non-zero u64 under REPLY_ACK, an empty GET_CONFIG
  payload); requests whose reply has no error form close the connection instead of lying.
  An unexpected exception (a bug here or in the device) is answered the same way, with its
  traceback logged; the fds of the message are released either way.
* A guest that breaks the virtio spec on a ring breaks only that ring (logged, err eventfd
  signalled); the front-end can set the ring up again.  So does a device bug while processing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

from vballoon.virtio.device import Device
from vballoon.errors import FrontendError, GuestError
from vballoon.vhost import fds as _fds
from vballoon.virtio.memory import GuestMemory, RegionSpec
from vballoon.virtio.virtqueue import VirtQueue
from vballoon.wire import (C, CONFIG, HEADER, MEM_REGION, MEMORY, U64, VRING_ADDR, VRING_STATE)

log = logging.getLogger(__name__)

PROTOCOL_FEATURES = (1 << C.VHOST_USER_PROTOCOL_F_MQ | 1 << C.VHOST_USER_PROTOCOL_F_REPLY_ACK
                     | 1 << C.VHOST_USER_PROTOCOL_F_CONFIG
                     | 1 << C.VHOST_USER_PROTOCOL_F_BACKEND_REQ)
F_PROTOCOL_FEATURES = 1 << C.VHOST_USER_F_PROTOCOL_FEATURES
REPLY_FLAGS = C.VHOST_USER_VERSION | C.VHOST_USER_REPLY_MASK    # exactly 0x5

# request code -> name, from the header's VHOST_USER_<REQUEST> defines (front-end requests)
NAMES = {v: k[len("VHOST_USER_"):] for k, v in vars(C).items()
         if k.startswith("VHOST_USER_") and 0 < v < 64 and not k.endswith(("_MASK", "_SIZE"))
         and not k.startswith(("VHOST_USER_PROTOCOL_F_", "VHOST_USER_BACKEND_",
                               "VHOST_USER_F_", "VHOST_USER_MAX", "VHOST_USER_VERSION"))}


class Message(NamedTuple):
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    @property
    def name(self) -> str:
        return NAMES.get(self.request, f"request {self.request}")


# -- actions: what the session asks the transport to do ------------------------------------

@dataclass(frozen=True)
class Watch:
    """Watch kick eventfd ``fd`` of queue ``index``; call :meth:`Session.kick` when it fires."""
    index: int
    fd: int


@dataclass(frozen=True)
class Unwatch:
    """Stop watching kick eventfd ``fd`` of queue ``index`` (a CloseFds follows)."""
    index: int
    fd: int


@dataclass(frozen=True)
class Signal:
    """Add 1 to eventfd ``fd`` (a call or err eventfd); never blocking."""
    fd: int


@dataclass(frozen=True)
class SetBackendChannel:
    """``fd`` (a socket) is the backend channel now; the transport owns it from here on and
    closes the previous one."""
    fd: int


@dataclass(frozen=True)
class SendBackend:
    """Send ``data`` (one whole message) on the backend channel, without waiting."""
    data: bytes


@dataclass(frozen=True)
class CloseFds:
    """Close these fds; the session no longer refers to them."""
    fds: tuple[int, ...]


@dataclass(frozen=True)
class Resume:
    """Queue ``index`` stopped at its per-call bound with work left: call
    :meth:`Session.resume` after the other ready callbacks (fairness)."""
    index: int


@dataclass(frozen=True)
class Close:
    """Close the connection (after sending the reply of the current request, if any)."""
    reason: str


Action = Union[Watch, Unwatch, Signal, SetBackendChannel, SendBackend, CloseFds, Resume, Close]


@dataclass(frozen=True)
class QueueStatus:
    """A queue as the session sees it (for the daemon, the control server and tests)."""
    index: int
    enabled: bool
    running: bool
    broken: bool
    kick_watched: bool


@dataclass(eq=False)
class Ring:
    vq: VirtQueue
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    running: bool = False       # device told queue_started
    broken: bool = False
    pending: bool = False       # kicked before it could run
    stopped_at: int | None = None   # the index GET_VRING_BASE answered, until the next start


def _pack_reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, REPLY_FLAGS, len(payload)) + payload


# Payload size each request must have (None: variable, checked by its handler).
_SIZES: dict[int, int | None] = {
    C.VHOST_USER_GET_FEATURES: 0, C.VHOST_USER_SET_FEATURES: 8, C.VHOST_USER_SET_OWNER: 0,
    C.VHOST_USER_RESET_OWNER: 0, C.VHOST_USER_SET_MEM_TABLE: None,
    C.VHOST_USER_SET_VRING_NUM: 8, C.VHOST_USER_SET_VRING_ADDR: 40,
    C.VHOST_USER_SET_VRING_BASE: 8, C.VHOST_USER_GET_VRING_BASE: 8,
    C.VHOST_USER_SET_VRING_KICK: 8, C.VHOST_USER_SET_VRING_CALL: 8,
    C.VHOST_USER_SET_VRING_ERR: 8, C.VHOST_USER_GET_PROTOCOL_FEATURES: 0,
    C.VHOST_USER_SET_PROTOCOL_FEATURES: 8, C.VHOST_USER_GET_QUEUE_NUM: 0,
    C.VHOST_USER_SET_VRING_ENABLE: 8, C.VHOST_USER_SET_BACKEND_REQ_FD: 0,
    C.VHOST_USER_GET_CONFIG: None, C.VHOST_USER_SET_CONFIG: None,
}
# Requests whose reply is part of the request (sent whatever NEED_REPLY says).
_EXPLICIT_REPLY = {C.VHOST_USER_GET_FEATURES, C.VHOST_USER_GET_PROTOCOL_FEATURES,
                   C.VHOST_USER_GET_VRING_BASE, C.VHOST_USER_GET_QUEUE_NUM,
                   C.VHOST_USER_GET_CONFIG, C.VHOST_USER_GET_MAX_MEM_SLOTS,
                   C.VHOST_USER_GET_STATUS, C.VHOST_USER_POSTCOPY_ADVISE,
                   C.VHOST_USER_POSTCOPY_END, C.VHOST_USER_IOTLB_MSG,
                   C.VHOST_USER_GET_INFLIGHT_FD, C.VHOST_USER_GET_SHARED_OBJECT,
                   C.VHOST_USER_SET_DEVICE_STATE_FD, C.VHOST_USER_CHECK_DEVICE_STATE,
                   C.VHOST_USER_GET_SHMEM_CONFIG}


MapMemory = Callable[[Sequence[RegionSpec], Sequence[int]], GuestMemory]
CheckFd = Callable[[int, str, str], None]


class Session:
    """One front-end connection's worth of vhost-user state, around one :class:`Device`.

    ``map_memory`` maps a memory table (and owns its fds from then on, closing them on failure
    too); ``check_fd(fd, kind, what)`` raises FrontendError unless ``fd`` is of ``kind``
    (``eventfd``, ``socket``) and makes it non-blocking.  Both default to the real thing.
    """

    def __init__(self, device: Device, emit: Callable[[Action], None], *,
                 map_memory: MapMemory = GuestMemory.map,
                 check_fd: CheckFd = _fds.check_fd) -> None:
        self.device = device
        self.emit = emit
        self.map_memory = map_memory
        self.check_fd = check_fd
        self.protocol_features = 0       # negotiated
        self.features = 0                # acked virtio features (incl. bit 30), 0 until set
        self.features_set = False
        self.owner = False
        self.mem: GuestMemory | None = None
        self.has_backend = False         # a backend channel was handed to the transport
        self.rings = [Ring(VirtQueue(i)) for i in range(device.max_queues())]
        self.closed = False
        device.config_changed = self.announce_config_change
        device.notify = self.notify
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            C.VHOST_USER_GET_FEATURES: self._get_features,
            C.VHOST_USER_SET_FEATURES: self._set_features,
            C.VHOST_USER_SET_OWNER: self._set_owner,
            C.VHOST_USER_RESET_OWNER: self._reset_owner,
            C.VHOST_USER_SET_MEM_TABLE: self._set_mem_table,
            C.VHOST_USER_SET_VRING_NUM: self._set_vring_num,
            C.VHOST_USER_SET_VRING_ADDR: self._set_vring_addr,
            C.VHOST_USER_SET_VRING_BASE: self._set_vring_base,
            C.VHOST_USER_GET_VRING_BASE: self._get_vring_base,
            C.VHOST_USER_SET_VRING_KICK: self._set_vring_kick,
            C.VHOST_USER_SET_VRING_CALL: self._set_vring_call,
            C.VHOST_USER_SET_VRING_ERR: self._set_vring_err,
            C.VHOST_USER_GET_PROTOCOL_FEATURES: self._get_protocol_features,
            C.VHOST_USER_SET_PROTOCOL_FEATURES: self._set_protocol_features,
            C.VHOST_USER_GET_QUEUE_NUM: self._get_queue_num,
            C.VHOST_USER_SET_VRING_ENABLE: self._set_vring_enable,
            C.VHOST_USER_SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            C.VHOST_USER_GET_CONFIG: self._get_config,
            C.VHOST_USER_SET_CONFIG: self._set_config,
        }

    # -- entry points ----------------------------------------------------------------------

    @staticmethod
    def check_header(request: int, flags: int, size: int) -> None:
        """Framing rules; a violation means the stream cannot be trusted any further."""
        if flags & C.VHOST_USER_VERSION_MASK != C.VHOST_USER_VERSION:
            raise FrontendError("header-version", f"flags {flags:#x}: version is not 1")
        if flags & C.VHOST_USER_REPLY_MASK:
            raise FrontendError("header-reply-bit", f"flags {flags:#x}: a request with REPLY set")
        if flags & ~0xF:
            raise FrontendError("header-reserved-flags", f"flags {flags:#x}: reserved bits set")
        if size > C.VHOST_USER_MAX_PAYLOAD:
            raise FrontendError("header-size", f"payload size {size} exceeds "
                                f"{C.VHOST_USER_MAX_PAYLOAD}")

    def handle(self, msg: Message) -> bytes | None:
        """Process one request; returns the reply to send, if any.

        A handler takes the fds it keeps out of ``msg.fds``; whatever is left when it returns
        or fails, for whatever reason, was not wanted and is released here (a CloseFds action),
        so every fd is closed exactly once.
        """
        if self.closed:
            self._release(msg.fds)
            raise FrontendError("session-closed", "message after the session was closed")
        log.debug("<- %s flags=%#x size=%d fds=%d", msg.name, msg.flags, len(msg.payload),
                  len(msg.fds))
        need_reply = bool(msg.flags & C.VHOST_USER_NEED_REPLY_MASK)
        ok = False
        try:
            handler = self._handlers.get(msg.request)
            if handler is None:
                raise FrontendError("request-unsupported",
                                    f"{msg.name} is not implemented by this back-end")
            want = _SIZES[msg.request]
            if want is not None and len(msg.payload) != want:
                raise FrontendError("payload-size", f"{msg.name}: payload of "
                                    f"{len(msg.payload)} bytes, expected {want}")
            reply = handler(msg)
            ok = True
        except FrontendError as e:
            log.error("front-end error in %s: %s", msg.name, e)
            return self._refuse(msg, need_reply, str(e))
        except Exception as e:      # a bug, here or in the device: answered, never a hang
            log.exception("internal-error: %s failed", msg.name)
            return self._refuse(msg, need_reply, f"internal-error: {msg.name}: {e!r}")
        finally:
            if msg.fds:
                if ok:
                    log.warning("fd-extra: %s carried %d fds it does not take (closed)",
                                msg.name, len(msg.fds))
                self._release(msg.fds)
        if reply is None and need_reply:
            reply = _pack_reply(msg.request, U64.pack(0))
        return reply

    def _refuse(self, msg: Message, need_reply: bool, reason: str) -> bytes | None:
        if msg.request == C.VHOST_USER_GET_CONFIG:
            return _pack_reply(msg.request, b"")       # the spec's error form
        if msg.request in _EXPLICIT_REPLY:
            self.emit(Close(reason))
            return None
        return _pack_reply(msg.request, U64.pack(1)) if need_reply else None

    def _release(self, fds: list[int]) -> None:
        if fds:
            self.emit(CloseFds(tuple(fds)))
            fds.clear()

    def kick(self, index: int) -> None:
        """The kick eventfd of ring ``index`` fired (the transport already drained it)."""
        ring = self.rings[index]
        if ring.broken:
            return
        if not ring.vq.ready:
            log.error("kick-before-setup: queue %d kicked before its addresses were set", index)
            return
        if not (ring.enabled and self.features_set):
            ring.pending = True
            return
        self._run(ring)

    def resume(self, index: int) -> None:
        """A :class:`Resume` came round: go on with queue ``index`` if it still runs."""
        ring = self.rings[index]
        if (ring.running and ring.kick_fd is not None and not ring.broken and ring.enabled
                and self.features_set and ring.vq.ready and self.mem is not None):
            self._run(ring)

    def kick_failed(self, index: int, why: str) -> None:
        """The kick fd of ring ``index`` cannot be read (end of file, an error): the ring is
        broken, once, and its kick fd is dropped; the front-end can set it up again."""
        ring = self.rings[index]
        if ring.kick_fd is None:
            return
        log.error("kick-fd-failed: queue %d: %s; queue stopped until set up again", index, why)
        self.emit(Unwatch(index, ring.kick_fd))
        self.emit(CloseFds((ring.kick_fd,)))
        ring.kick_fd = None
        ring.broken = True
        if ring.err_fd is not None:
            self.emit(Signal(ring.err_fd))

    def notify(self, index: int) -> None:
        """Interrupt the driver on ring ``index`` if what was pushed calls for it."""
        ring = self.rings[index]
        if ring.vq.should_notify() and ring.call_fd is not None:
            self.emit(Signal(ring.call_fd))

    def announce_config_change(self) -> None:
        """BACKEND_CONFIG_CHANGE_MSG, without NEED_REPLY (QEMU may be blocked on us), once the
        driver runs; before that QEMU would drop it and the driver reads config at start."""
        if not self.has_backend or not self.driver_running or self.closed:
            log.debug("config change not announced: driver not running or no backend channel")
            return
        self.emit(SendBackend(HEADER.pack(C.VHOST_USER_BACKEND_CONFIG_CHANGE_MSG,
                                          C.VHOST_USER_VERSION, 0)))

    @property
    def driver_running(self) -> bool:
        """Our view of DRIVER_OK.  QEMU's generic device sends no status; it sets the features
        and enables the rings while it handles the driver's DRIVER_OK (vhost_dev_start)."""
        return self.features_set and any(r.enabled for r in self.rings)

    def queue_status(self) -> list[QueueStatus]:
        return [QueueStatus(r.vq.index, r.enabled, r.running, r.broken, r.kick_fd is not None)
                for r in self.rings]

    def close(self) -> None:
        """The connection is gone: stop every ring, drop the memory, release every fd.

        Every step runs even if the device fails in one (logged): a device bug must not leave
        fds open or guest RAM mapped.  Ring views are released before the mappings go."""
        if self.closed:
            return
        self.closed = True
        for ring in self.rings:
            try:
                self._stop_ring(ring)
            except Exception:
                log.exception("internal-error: stopping queue %d", ring.vq.index)
            fds = [fd for fd in (ring.call_fd, ring.err_fd) if fd is not None]
            ring.call_fd = ring.err_fd = None
            self._release(fds)
            ring.vq.reset()
        for step in (self.device.reset, lambda: self.device.memory_changed(None)):
            try:
                step()
            except Exception:
                log.exception("internal-error: the device failed while the session closed")
        if self.mem is not None:
            mem, self.mem = self.mem, None
            mem.close()

    # -- ring machinery ------------------------------------------------------------------

    def _ring(self, index: int) -> Ring:
        if not 0 <= index < len(self.rings):
            raise FrontendError("vring-index", f"vring index {index} out of range "
                                f"(this device has {len(self.rings)} queues)")
        return self.rings[index]

    def _run(self, ring: Ring) -> None:
        assert self.mem is not None
        ring.pending = False
        more = False
        try:
            self.mem.check_backing()
            if not ring.running:
                ring.running = True
                self.device.queue_started(ring.vq, self.mem)
            more = bool(self.device.process(ring.vq, self.mem))
        except GuestError as e:
            self._break(ring, e)
        except FrontendError as e:
            # guest RAM the front-end shared is no longer all there (truncated)
            log.error("closing the connection: %s", e)
            self._break(ring, e)
            self.emit(Close(str(e)))
            return
        except Exception as e:   # a bug, not the guest: this queue stops, the rest go on
            log.exception("internal-error: queue %d: processing failed; queue stopped",
                          ring.vq.index)
            self._break(ring, e)
        self.notify(ring.vq.index)
        if more and not ring.broken:
            self.emit(Resume(ring.vq.index))

    def _break(self, ring: Ring, e: Exception) -> None:
        if isinstance(e, GuestError):
            log.error("queue %d broken by the guest: %s", ring.vq.index, e)
        ring.broken = True
        if ring.err_fd is not None:
            self.emit(Signal(ring.err_fd))

    def _stop_ring(self, ring: Ring) -> None:
        if ring.kick_fd is not None:
            self.emit(Unwatch(ring.vq.index, ring.kick_fd))
            self.emit(CloseFds((ring.kick_fd,)))
            ring.kick_fd = None
        try:
            if ring.running:
                self.device.queue_stopped(ring.vq)
        finally:
            ring.running = ring.pending = False

    def _attach(self, ring: Ring) -> None:
        if self.mem is None:
            raise FrontendError("vring-addr-before-mem-table",
                                f"queue {ring.vq.index}: ring addresses before SET_MEM_TABLE")
        try:
            ring.vq.attach(self.mem)
            ring.broken = False
        except GuestError as e:
            ring.vq.detach()
            raise FrontendError("vring-addr-outside-memory",
                                f"queue {ring.vq.index}: {e}") from None

    def _maybe_run_pending(self) -> None:
        for ring in self.rings:
            if ring.pending and ring.enabled and self.features_set and not ring.broken:
                self._run(ring)

    # -- handlers --------------------------------------------------------------------------

    def _get_features(self, msg: Message) -> bytes:
        return _pack_reply(msg.request, U64.pack(self.device.features() | F_PROTOCOL_FEATURES))

    def _set_features(self, msg: Message) -> None:
        (acked,) = U64.unpack(msg.payload)
        offered = self.device.features() | F_PROTOCOL_FEATURES
        if acked & ~offered:
            raise FrontendError("features-not-offered",
                                f"SET_FEATURES {acked:#x} acks bits {acked & ~offered:#x} "
                                "that were not offered")
        self.features, self.features_set = acked, True
        for ring in self.rings:
            ring.vq.event_idx = bool(acked >> C.VIRTIO_RING_F_EVENT_IDX & 1)
            ring.vq.indirect = bool(acked >> C.VIRTIO_RING_F_INDIRECT_DESC & 1)
            if not acked & F_PROTOCOL_FEATURES:
                ring.enabled = True     # without bit 30 rings are enabled from the start
        self.device.set_features(acked & ~F_PROTOCOL_FEATURES)
        self._maybe_run_pending()
        return None

    def _set_owner(self, msg: Message) -> None:
        self.owner = True
        return None

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; treated as a device reset: rings stopped and disabled, driver state gone.
        for ring in self.rings:
            self._stop_ring(ring)
            ring.enabled = False
        self.features_set = False
        self.device.reset()
        return None

    def _set_mem_table(self, msg: Message) -> None:
        p = msg.payload
        if len(p) < MEMORY.size:
            raise FrontendError("payload-size", "SET_MEM_TABLE shorter than its header")
        nregions, _pad = MEMORY.unpack_from(p)
        if not 0 < nregions <= C.VHOST_MEMORY_BASELINE_NREGIONS:
            raise FrontendError("mem-table-nregions", f"{nregions} regions (1 to "
                                f"{C.VHOST_MEMORY_BASELINE_NREGIONS} allowed)")
        # QEMU sends exactly nregions entries; older front-ends send all 8 slots.
        if len(p) not in (MEMORY.size + MEM_REGION.size * nregions,
                          MEMORY.size + MEM_REGION.size * C.VHOST_MEMORY_BASELINE_NREGIONS):
            raise FrontendError("payload-size", f"SET_MEM_TABLE of {len(p)} bytes for "
                                f"{nregions} regions")
        specs = [RegionSpec(*MEM_REGION.unpack_from(p, MEMORY.size + MEM_REGION.size * i))
                 for i in range(nregions)]
        fds = list(msg.fds)
        msg.fds.clear()
        mem = self.map_memory(specs, fds)      # owns the fds, and closes them on failure
        old, self.mem = self.mem, mem
        try:
            for ring in self.rings:            # a table may arrive again while rings run
                if ring.vq.ready:
                    try:
                        self._attach(ring)
                    except FrontendError as e:
                        log.error("%s", e)
                        ring.broken = True
        finally:
            if old is not None:                # no ring refers to it any more
                old.close()
        self.device.memory_changed(mem)
        return None

    def _set_vring_num(self, msg: Message) -> None:
        index, num = VRING_STATE.unpack(msg.payload)
        ring = self._ring(index)
        if not 0 < num <= C.VIRTQ_MAX_SIZE or num & (num - 1):
            raise FrontendError("vring-num", f"queue {index}: size {num} is not a power of two "
                                f"in 1..{C.VIRTQ_MAX_SIZE}")
        ring.vq.detach()
        ring.vq.num = num
        return None

    def _set_vring_addr(self, msg: Message) -> None:
        a = VRING_ADDR.unpack(msg.payload)
        ring = self._ring(a.index)
        if a.flags & ~C.VHOST_VRING_F_LOG:
            raise FrontendError("vring-addr-flags", f"queue {a.index}: flags {a.flags:#x}")
        for name, addr, align in (("desc", a.desc_user_addr, 16), ("avail", a.avail_user_addr, 2),
                                  ("used", a.used_user_addr, 4)):
            if addr % align:
                raise FrontendError("vring-addr-alignment", f"queue {a.index}: {name} address "
                                    f"{addr:#x} is not {align}-byte aligned")
        vq = ring.vq
        vq.desc_addr, vq.avail_addr, vq.used_addr = (a.desc_user_addr, a.avail_user_addr,
                                                     a.used_user_addr)
        self._attach(ring)
        return None

    def _set_vring_base(self, msg: Message) -> None:
        index, num = VRING_STATE.unpack(msg.payload)
        ring = self._ring(index)
        if num > 0xFFFF:
            raise FrontendError("vring-base", f"queue {index}: base {num} exceeds 16 bits")
        if num == 0 and ring.stopped_at:
            # QEMU sends no reset to this device (no STATUS): a guest reboot shows as a ring
            # that had consumed buffers restarting at 0, where a paused VM resumes at the index
            # GET_VRING_BASE gave.  The driver is a new one; its predecessor's state is gone.
            log.info("queue %d restarts at 0 after %d: a new driver", index, ring.stopped_at)
            for r in self.rings:
                r.stopped_at = None
            self.device.driver_restarted()
        ring.vq.last_avail_idx = num
        ring.vq.forget_in_flight()
        ring.vq.signalled_used = None
        return None

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = VRING_STATE.unpack(msg.payload)
        ring = self._ring(index)
        self._stop_ring(ring)
        base = ring.vq.stop_index()
        ring.vq.last_avail_idx = ring.stopped_at = base
        ring.vq.forget_in_flight()
        return _pack_reply(msg.request, VRING_STATE.pack(index, base))

    def _vring_fd(self, msg: Message) -> tuple[Ring, int | None]:
        (value,) = U64.unpack(msg.payload)
        if value & ~(C.VHOST_USER_VRING_IDX_MASK | C.VHOST_USER_VRING_NOFD_MASK):
            raise FrontendError("vring-fd-payload", f"{msg.name}: reserved bits in {value:#x}")
        ring = self._ring(value & C.VHOST_USER_VRING_IDX_MASK)
        nofd = bool(value & C.VHOST_USER_VRING_NOFD_MASK)
        if nofd:
            return ring, None
        if not msg.fds:
            raise FrontendError("fd-missing", f"{msg.name}: no fd attached and NOFD not set")
        # an eventfd, non-blocking: a pipe at EOF would spin the loop, a regular file cannot
        # be watched, and a blocking call fd with a full counter would block the daemon
        self.check_fd(msg.fds[0], "eventfd", f"{msg.name} fd of queue {ring.vq.index}")
        return ring, msg.fds.pop(0)

    def _set_vring_kick(self, msg: Message) -> None:
        ring, fd = self._vring_fd(msg)
        if fd is None:
            raise FrontendError("kick-nofd-unsupported", f"queue {ring.vq.index}: polling "
                                "mode (no kick fd) is not supported")
        self._stop_ring(ring)
        ring.kick_fd = fd
        self.emit(Watch(ring.vq.index, fd))
        return None

    def _set_vring_call(self, msg: Message) -> None:
        self._replace_fd(msg, "call_fd")

    def _set_vring_err(self, msg: Message) -> None:
        self._replace_fd(msg, "err_fd")

    def _replace_fd(self, msg: Message, attr: str) -> None:
        """A ring's call or err eventfd: the new one (or none, NOFD) replaces and closes the old."""
        ring, fd = self._vring_fd(msg)
        old = getattr(ring, attr)
        setattr(ring, attr, fd)
        if old is not None:
            self.emit(CloseFds((old,)))

    def _get_protocol_features(self, msg: Message) -> bytes:
        return _pack_reply(msg.request, U64.pack(PROTOCOL_FEATURES))

    def _set_protocol_features(self, msg: Message) -> None:
        (acked,) = U64.unpack(msg.payload)
        if acked & ~PROTOCOL_FEATURES:
            raise FrontendError("protocol-features-not-offered",
                                f"SET_PROTOCOL_FEATURES {acked:#x} sets bits "
                                f"{acked & ~PROTOCOL_FEATURES:#x} that were not offered")
        self.protocol_features = acked
        return None

    def _has(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    def _get_queue_num(self, msg: Message) -> bytes:
        if not self._has(C.VHOST_USER_PROTOCOL_F_MQ):
            raise FrontendError("mq-not-negotiated", "GET_QUEUE_NUM without the MQ feature")
        return _pack_reply(msg.request, U64.pack(len(self.rings)))

    def _set_vring_enable(self, msg: Message) -> None:
        if not self.features & F_PROTOCOL_FEATURES and self.features_set:
            raise FrontendError("enable-without-protocol-features",
                                "SET_VRING_ENABLE but VHOST_USER_F_PROTOCOL_FEATURES not acked")
        index, num = VRING_STATE.unpack(msg.payload)
        ring = self._ring(index)
        if num not in (0, 1):
            raise FrontendError("vring-enable-value", f"queue {index}: enable value {num}")
        ring.enabled = bool(num)
        if ring.enabled and ring.pending and self.features_set and not ring.broken:
            self._run(ring)
        return None

    def _set_backend_req_fd(self, msg: Message) -> None:
        if not self._has(C.VHOST_USER_PROTOCOL_F_BACKEND_REQ):
            raise FrontendError("backend-req-not-negotiated",
                                "SET_BACKEND_REQ_FD without the BACKEND_REQ feature")
        if not msg.fds:
            raise FrontendError("fd-missing", "SET_BACKEND_REQ_FD without an fd")
        self.check_fd(msg.fds[0], "socket", "SET_BACKEND_REQ_FD fd")
        self.emit(SetBackendChannel(msg.fds.pop(0)))     # the transport owns it now
        self.has_backend = True
        return None

    def _config_payload(self, msg: Message) -> tuple[int, int, int, bytes]:
        if len(msg.payload) < CONFIG.size:
            raise FrontendError("payload-size", f"{msg.name}: payload shorter than 12 bytes")
        offset, size, flags = CONFIG.unpack_from(msg.payload)
        data = msg.payload[CONFIG.size:]
        if size != len(data) or size > C.VHOST_USER_MAX_CONFIG_SIZE:
            raise FrontendError("config-size", f"{msg.name}: size field {size} with "
                                f"{len(data)} bytes of config")
        have = len(self.device.get_config())
        if offset + size > have:
            raise FrontendError("config-range", f"{msg.name}: bytes {offset}..{offset + size} "
                                f"but this device's config space is {have} bytes "
                                f"(QEMU: config_size={have})")
        return offset, size, flags, data

    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags, _ = self._config_payload(msg)
        data = self.device.get_config()[offset:offset + size]
        return _pack_reply(msg.request, CONFIG.pack(offset, size, flags) + data)

    def _set_config(self, msg: Message) -> None:
        offset, _, flags, data = self._config_payload(msg)
        if flags not in (C.VHOST_SET_CONFIG_TYPE_FRONTEND, C.VHOST_SET_CONFIG_TYPE_MIGRATION):
            raise FrontendError("config-flags", f"SET_CONFIG flags {flags}")
        self.device.set_config(offset, data, flags == C.VHOST_SET_CONFIG_TYPE_MIGRATION)
        return None
