"""Split virtqueue, device side (VIRTIO 1.2 §2.7).

:class:`VirtQueue` holds only the negotiated state (size, ring addresses, indices, features) and
views of the three ring areas, translated once through the guest memory's checked path; the
buffers a chain points at are checked when the chain is walked and read or written later through
that same path.  Nothing here does I/O: notifying the driver is the caller's job, told by
:meth:`VirtQueue.push` / :meth:`VirtQueue.should_notify`.

Every rule a hostile driver could break raises :class:`~vballoon.errors.GuestError` with a rule
name; the session then marks the queue broken (it stays so until the front-end sets it up again).
"""
from __future__ import annotations

from typing import Any, NamedTuple
from vballoon.virtio._vring import ffi as _ffi, lib as _lib
from vballoon.errors import GuestError, GuestMemoryError
from vballoon.virtio.memory import GuestMemory
from vballoon.wire import AVAIL, C, DESC, LE16, USED, USED_ELEM

DESC_SIZE = DESC.size
_DESC = DESC.struct
_LE16 = LE16
_ELEM = USED_ELEM.struct
AVAIL_RING = AVAIL.offsets["ring"]
USED_RING = USED.offsets["ring"]
MAX_CHAIN_BYTES = 1 << 32    # §2.7.5.2: total length of a chain MUST NOT exceed 2^32

# vq_walk's error codes: rule name, message ({a} and {b} are its info[0] and info[1])
_WALK_ERRORS = {
    _lib.VQ_ERR_HEAD: ("desc-head-out-of-range", "head {a} >= size {b}"),
    _lib.VQ_ERR_LOOP: ("desc-loop", "chain at {a} loops (more than {b} descriptors)"),
    _lib.VQ_ERR_NEXT: ("desc-next-out-of-range", "next {a} >= table size {b}"),
    _lib.VQ_ERR_INDIRECT_FEATURE: ("indirect-not-negotiated", "INDIRECT without the feature"),
    _lib.VQ_ERR_INDIRECT_NESTED: ("indirect-nested",
                                  "indirect table inside an indirect table"),
    _lib.VQ_ERR_INDIRECT_NEXT: ("indirect-with-next", "INDIRECT and NEXT both set"),
    _lib.VQ_ERR_INDIRECT_LENGTH: ("indirect-bad-length",
                                  "indirect table of {b} bytes (a multiple of 16, at most "
                                  "the queue size)"),
    _lib.VQ_ERR_INDIRECT_ALONE: ("indirect-not-alone",
                                 "indirect descriptor inside a chain"),
    _lib.VQ_ERR_READ_AFTER_WRITE: ("desc-read-after-write", "device-readable descriptor "
                                   "after a device-writable one"),
    _lib.VQ_ERR_TOO_LONG: ("chain-too-long", "chain at {a} is longer than 2^32 bytes"),
    _lib.VQ_ERR_OUTSIDE: ("addr-outside-memory", "guest-physical range {a:#x}+{b:#x} is not "
                          "inside one region"),
}
_WALK_ERROR_TYPES = {_lib.VQ_ERR_OUTSIDE: GuestMemoryError}


def avail_size(num: int) -> int:
    return AVAIL_RING + 2 * num + 2        # flags, idx, ring[num], used_event


def used_size(num: int) -> int:
    return USED_RING + USED_ELEM.size * num + 2   # flags, idx, ring[num], avail_event


class Buffer(NamedTuple):
    """One descriptor of a chain: guest-physical address, length, device-writable?"""

    addr: int
    len: int
    write: bool


class Chain:
    """A descriptor chain popped from the avail ring.  Return it with :meth:`VirtQueue.push`.

    Its device-readable buffers come first (the walk enforces it): ``nread`` of them.
    :meth:`read_spans` gives where they are mapped in this process, each checked to lie in
    guest memory: valid only until the next memory table, so use them while handling the chain
    (:meth:`forget_hosts` before keeping a chain, as the stats and request buffers are kept).
    """

    __slots__ = ("head", "addrs", "lens", "nread", "_hosts", "_clens", "_buffers")

    def __init__(self, head: int, addrs: list[int], lens: list[int], nread: int,
                 hosts: Any = None, clens: Any = None) -> None:
        self.head, self.addrs, self.lens, self.nread = head, addrs, lens, nread
        self._hosts, self._clens = hosts, clens
        self._buffers: list[Buffer] | None = None

    @property
    def buffers(self) -> list[Buffer]:
        if self._buffers is None:
            self._buffers = [Buffer(a, n, i >= self.nread)
                             for i, (a, n) in enumerate(zip(self.addrs, self.lens))]
        return self._buffers

    @property
    def readable(self) -> list[Buffer]:
        return self.buffers[:self.nread]

    @property
    def writable(self) -> list[Buffer]:
        return self.buffers[self.nread:]

    def read_spans(self) -> tuple[Any, Any, int]:
        """The readable buffers as cffi arrays (``uint8_t *[]`` host pointers, ``size_t[]``
        lengths) and their count: the no-copy path for big chains.  The arrays are the
        chain's own copies; a consumer may adjust them."""
        if self._hosts is None:
            raise GuestError("chain-hosts-dropped", f"chain {self.head}: host pointers dropped")
        return self._hosts, self._clens, self.nread

    def forget_hosts(self) -> None:
        self._hosts = self._clens = None

    def read(self, mem: GuestMemory, limit: int = 1 << 20) -> bytes:
        """The device-readable bytes of the chain, concatenated (at most ``limit``)."""
        total = sum(b.len for b in self.readable)
        if total > limit:
            raise GuestError("chain-too-long", f"chain {self.head} carries {total} bytes, "
                             f"more than the {limit} this queue accepts")
        return b"".join(mem.gpa_view(b.addr, b.len) for b in self.readable)

    def write(self, mem: GuestMemory, data: bytes) -> int:
        """Write ``data`` into the device-writable buffers in order; returns bytes written."""
        pos = 0
        for b in self.writable:
            if pos >= len(data):
                break
            n = min(b.len, len(data) - pos)
            mem.gpa_view(b.addr, n)[:] = data[pos:pos + n]
            pos += n
        if pos < len(data):
            raise GuestError("chain-too-short", f"chain {self.head} has room for {pos} of "
                             f"{len(data)} bytes")
        return pos


class VirtQueue:
    """Device side of one split virtqueue."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0   # front-end virtual addresses
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used: int | None = None   # used idx at the last notification
        self.event_idx = False
        self.indirect = False
        # heads popped and not yet pushed: head -> times (a hostile driver may publish a head
        # twice); a dict, so that a push in any order is O(1)
        self._inflight: dict[int, int] = {}
        self._ninflight = 0
        self._desc: memoryview | None = None
        self._desc_p = _ffi.NULL                  # the descriptor table, for the C walk
        self._out: tuple = ()                     # the walk's output arrays
        self._avail: memoryview | None = None
        self._used: memoryview | None = None

    # -- set-up ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._desc is not None

    def attach(self, mem: GuestMemory) -> None:
        """Translate the ring addresses into views (again, after a new memory table)."""
        self.detach()
        if self.num == 0:
            raise GuestError("vring-no-size", f"queue {self.index}: SET_VRING_NUM missing")
        desc = mem.uva_view(self.desc_addr, DESC_SIZE * self.num)
        avail = mem.uva_view(self.avail_addr, avail_size(self.num))
        used = mem.uva_view(self.used_addr, used_size(self.num))
        self._desc, self._avail, self._used = desc, avail, used
        self._desc_p = _ffi.from_buffer("uint8_t[]", desc)
        self._out = (_ffi.new("uint64_t[]", self.num), _ffi.new("size_t[]", self.num),
                     _ffi.new("uint8_t *[]", self.num), _ffi.new("uint64_t[3]"))
        self.used_idx = _LE16.unpack_from(used, 2)[0]

    def detach(self) -> None:
        if self._desc_p != _ffi.NULL:
            _ffi.release(self._desc_p)
            self._desc_p = _ffi.NULL
        for v in (self._desc, self._avail, self._used):
            if v is not None:
                v.release()
        self._desc = self._avail = self._used = None

    # -- driver -> device ----------------------------------------------------------------

    def avail_idx(self) -> int:
        assert self._avail is not None
        return _LE16.unpack_from(self._avail, 2)[0]

    def pop(self, mem: GuestMemory) -> Chain | None:
        """The next available chain, walked and checked, or None when the ring is empty."""
        avail = self._avail
        if avail is None:
            raise GuestError("vring-not-ready", f"queue {self.index} is not set up")
        idx = _LE16.unpack_from(avail, 2)[0]
        pending = (idx - self.last_avail_idx) & 0xFFFF
        used = self._used
        assert used is not None
        if pending == 0 and self.event_idx:
            # avail_event (written at each pop) must be visible before avail idx is read again,
            # or a buffer added meanwhile is neither seen nor kicked (Linux vhost: smp_mb()).
            _LE16.pack_into(used, USED_RING + USED_ELEM.size * self.num, self.last_avail_idx)
            _lib.vq_mb()
            idx = _LE16.unpack_from(avail, 2)[0]
            pending = (idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.num:
            raise GuestError("avail-idx-jump", f"queue {self.index}: avail idx {idx} is "
                             f"{pending} ahead of {self.last_avail_idx}, more than size {self.num}")
        _lib.vq_rmb()            # read the ring entry only after the idx that published it
        head = _LE16.unpack_from(avail, AVAIL_RING + 2 * (self.last_avail_idx % self.num))[0]
        chain = self._walk(mem, head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        self._inflight[head] = self._inflight.get(head, 0) + 1
        self._ninflight += 1
        if self.event_idx:   # ask for a kick as soon as the driver adds past this one
            _LE16.pack_into(used, USED_RING + USED_ELEM.size * self.num, self.last_avail_idx)
        return chain

    def _walk(self, mem: GuestMemory, head: int) -> Chain:
        """The chain at ``head`` (§2.7.5 and §2.7.5.3), bounded and checked.

        The walk is C (``vballoon.virtio._vring.vq_walk``); each of its error codes is a rule here.
        """
        addr, length, host, info = self._out
        n = _lib.vq_walk(self._desc_p, self.num, head, self.indirect, *mem.c_table,
                         addr, length, host, info)
        if n < 0:
            rule, what = _WALK_ERRORS[n]
            raise _WALK_ERROR_TYPES.get(n, GuestError)(
                rule, f"queue {self.index}: " + what.format(head=head, a=info[0], b=info[1]))
        hosts, clens = _ffi.new("uint8_t *[]", n), _ffi.new("size_t[]", n)
        _ffi.memmove(hosts, host, _ffi.sizeof(hosts))
        _ffi.memmove(clens, length, _ffi.sizeof(clens))
        return Chain(head, _ffi.unpack(addr, n), _ffi.unpack(length, n), min(info[2], n),
                     hosts, clens)

    # -- device -> driver ----------------------------------------------------------------

    def push(self, chain: Chain | int, written: int = 0) -> None:
        """Return a chain to the driver: used element first, then the used idx."""
        head = chain.head if isinstance(chain, Chain) else chain
        used = self._used
        if used is None:
            raise GuestError("vring-not-ready", f"queue {self.index} is not set up")
        times = self._inflight.get(head)
        if not times:
            raise GuestError("push-unknown-head",
                             f"queue {self.index}: head {head} is not in flight")
        if times == 1:
            del self._inflight[head]
        else:
            self._inflight[head] = times - 1
        self._ninflight -= 1
        _ELEM.pack_into(used, USED_RING + USED_ELEM.size * (self.used_idx % self.num), head,
                        written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _lib.vq_wmb()            # the element is visible before the idx that publishes it
        _LE16.pack_into(used, 2, self.used_idx)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        if self._avail is None:
            return False
        old, new = self.signalled_used, self.used_idx
        if old == new:
            return False
        if self.event_idx:
            used_event = _LE16.unpack_from(self._avail, AVAIL_RING + 2 * self.num)[0]
            # vring_need_event() of Linux's virtio_ring.h: notify when used_event is in [old, new)
            notify = old is None or ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            notify = not _LE16.unpack_from(self._avail, 0)[0] & C.VRING_AVAIL_F_NO_INTERRUPT
        self.signalled_used = new
        return notify

    def stop_index(self) -> int:
        """The avail index to report at GET_VRING_BASE.

        Chains the device still holds (a stats buffer, a request buffer) were popped last;
        rewinding over them lets the next start pop them again instead of losing them.
        """
        return (self.last_avail_idx - self._ninflight) & 0xFFFF

    @property
    def in_flight(self) -> int:
        """How many chains were popped and not pushed yet."""
        return self._ninflight

    def forget_in_flight(self) -> None:
        """The front-end set the ring's index (SET/GET_VRING_BASE): nothing is in flight."""
        self._inflight.clear()
        self._ninflight = 0

    def reset(self) -> None:
        self.detach()
        self.__init__(self.index)  # type: ignore[misc]
