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

from dataclasses import dataclass
from typing import NamedTuple
from ._fastbits import lib as _lib
from .errors import GuestError
from .memory import GuestMemory
from .wire import AVAIL, C, DESC, LE16, USED, USED_ELEM

DESC_SIZE = DESC.size
_DESC = DESC.struct
_LE16 = LE16
_ELEM = USED_ELEM.struct
AVAIL_RING = AVAIL.offsets["ring"]
USED_RING = USED.offsets["ring"]
MAX_CHAIN_BYTES = 1 << 32    # §2.7.5.2: total length of a chain MUST NOT exceed 2^32


def avail_size(num: int) -> int:
    return AVAIL_RING + 2 * num + 2        # flags, idx, ring[num], used_event


def used_size(num: int) -> int:
    return USED_RING + USED_ELEM.size * num + 2   # flags, idx, ring[num], avail_event


class Buffer(NamedTuple):
    """One descriptor of a chain: guest-physical address, length, device-writable?"""

    addr: int
    len: int
    write: bool


@dataclass(slots=True)
class Chain:
    """A descriptor chain popped from the avail ring.  Return it with :meth:`VirtQueue.push`."""

    head: int
    buffers: list[Buffer]

    @property
    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.write]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.write]

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
        self.inflight: list[int] = []             # heads popped and not yet pushed
        self._desc: memoryview | None = None
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
        self.used_idx = _LE16.unpack_from(used, 2)[0]

    def detach(self) -> None:
        for v in (self._desc, self._avail, self._used):
            if v is not None:
                v.release()
        self._desc = self._avail = self._used = None

    # -- driver -> device ----------------------------------------------------------------

    def avail_idx(self) -> int:
        assert self._avail is not None
        return _LE16.unpack_from(self._avail, 2)[0]

    def has_work(self) -> bool:
        return self._avail is not None and self.avail_idx() != self.last_avail_idx

    def pop(self, mem: GuestMemory) -> Chain | None:
        """The next available chain, walked and checked, or None when the ring is empty."""
        avail = self._avail
        if avail is None:
            raise GuestError("vring-not-ready", f"queue {self.index} is not set up")
        idx = _LE16.unpack_from(avail, 2)[0]
        pending = (idx - self.last_avail_idx) & 0xFFFF
        if pending == 0 and self.event_idx:
            # avail_event (written at each pop) must be visible before avail idx is read again,
            # or a buffer added meanwhile is neither seen nor kicked (Linux vhost: smp_mb()).
            _LE16.pack_into(self._used, USED_RING + USED_ELEM.size * self.num, self.last_avail_idx)
            _lib.fb_mb()
            idx = _LE16.unpack_from(avail, 2)[0]
            pending = (idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.num:
            raise GuestError("avail-idx-jump", f"queue {self.index}: avail idx {idx} is "
                             f"{pending} ahead of {self.last_avail_idx}, more than size {self.num}")
        _lib.fb_rmb()            # read the ring entry only after the idx that published it
        head = _LE16.unpack_from(avail, AVAIL_RING + 2 * (self.last_avail_idx % self.num))[0]
        chain = Chain(head, self._walk(mem, head))
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        self.inflight.append(head)
        if self.event_idx:   # ask for a kick as soon as the driver adds past this one
            _LE16.pack_into(self._used, USED_RING + USED_ELEM.size * self.num, self.last_avail_idx)
        return chain

    def _walk(self, mem: GuestMemory, head: int) -> list[Buffer]:
        """Descriptors of the chain at ``head`` (§2.7.5 and §2.7.5.3), bounded and checked."""
        table, size = self._desc, self.num
        out: list[Buffer] = []
        check = mem.check_gpa
        if head >= size:
            raise GuestError("desc-head-out-of-range",
                             f"queue {self.index}: head {head} >= size {size}")
        i, seen, total, indirect, wrote = head, 0, 0, False, False
        while True:
            seen += 1
            if seen > size:
                raise GuestError("desc-loop", f"queue {self.index}: chain at {head} loops "
                                 f"(more than {size} descriptors)")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * i)
            if flags & C.VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    raise GuestError("indirect-not-negotiated",
                                     f"queue {self.index}: INDIRECT without the feature")
                if indirect:
                    raise GuestError("indirect-nested",
                                     f"queue {self.index}: indirect table inside an indirect table")
                if flags & C.VRING_DESC_F_NEXT:
                    raise GuestError("indirect-with-next",
                                     f"queue {self.index}: INDIRECT and NEXT both set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > C.VIRTQ_MAX_SIZE:
                    raise GuestError("indirect-bad-length",
                                     f"queue {self.index}: indirect table of {length} bytes")
                if seen != 1:
                    # §2.7.5.3.1: the driver MUST NOT chain an indirect descriptor after others
                    raise GuestError("indirect-not-alone",
                                     f"queue {self.index}: indirect descriptor inside a chain")
                table, size = mem.gpa_view(addr, length), length // DESC_SIZE
                i, seen, indirect = 0, 0, True
                continue
            write = bool(flags & C.VRING_DESC_F_WRITE)
            if wrote and not write:
                raise GuestError("desc-read-after-write", f"queue {self.index}: device-readable "
                                 "descriptor after a device-writable one")
            wrote |= write
            total += length
            if total > MAX_CHAIN_BYTES:
                raise GuestError("chain-too-long", f"queue {self.index}: chain at {head} is "
                                 f"longer than 2^32 bytes")
            check(addr, length)
            out.append(Buffer(addr, length, write))
            if not flags & C.VRING_DESC_F_NEXT:
                return out
            if nxt >= size:
                raise GuestError("desc-next-out-of-range",
                                 f"queue {self.index}: next {nxt} >= table size {size}")
            i = nxt

    # -- device -> driver ----------------------------------------------------------------

    def push(self, chain: Chain | int, written: int = 0) -> None:
        """Return a chain to the driver: used element first, then the used idx."""
        head = chain.head if isinstance(chain, Chain) else chain
        used = self._used
        if used is None:
            raise GuestError("vring-not-ready", f"queue {self.index} is not set up")
        try:
            self.inflight.remove(head)
        except ValueError:
            raise GuestError("push-unknown-head",
                             f"queue {self.index}: head {head} is not in flight") from None
        _ELEM.pack_into(used, USED_RING + USED_ELEM.size * (self.used_idx % self.num), head,
                        written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _lib.fb_wmb()            # the element is visible before the idx that publishes it
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
        return (self.last_avail_idx - len(self.inflight)) & 0xFFFF

    def reset(self) -> None:
        self.detach()
        self.__init__(self.index)  # type: ignore[misc]
