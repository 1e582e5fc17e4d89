"""The device side of the bitmap queue's round protocol (``protocol/bitmap-queue.md`` §4-§6):
request ids, the round state machine, and the validation of every chain the guest returns.

It is pure (no queue, no clock: the caller passes ``now``) so that each rule has a test of its
own; the balloon device feeds it chains.
"""
from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..errors import ConfigError
from .map import (CHUNK_HEADER, CMD_GET_FREE, F_DONE, HDR_SIZE, MAX_CHUNK_PFNS, PAGE_SHIFT,
                  PFN_ALIGN, REQUEST, FreePageMap, check_int, ffi, ram_extents)

ROUND_IDLE_TIMEOUT = 5.0         # seconds without a merged chunk: the round is aborted (§5)


# -- the round protocol (spec §4-§6) ---------------------------------------------------------------

class RoundState(str, enum.Enum):
    """§5.  IDLE is "no round yet"; DONE and ABORTED are final and keep their map.

    A ``str`` enum: a state equals its name on the wire (``RoundState.DONE == "done"``)."""

    IDLE = "idle"
    REQUESTED = "requested"      # request id handed to the driver, no chunk merged yet
    RECEIVING = "receiving"      # at least one CONT chunk merged
    DONE = "done"                # the DONE chunk merged
    ABORTED = "aborted"          # timed out, superseded by a new request, or the memory changed


class Verdict(enum.Enum):
    """What the device did with one chain of the bitmap queue (§6).  Values are rule names."""

    ACCEPTED = "accepted"                  # merged; the round goes on
    DONE = "done"                          # merged; it was the round's last chunk
    WRITABLE = "chunk-writable"            # a device-writable descriptor in a chunk
    SHORT_HEADER = "chunk-short-header"    # fewer readable bytes than a header
    BAD_CMD = "chunk-cmd"                  # cmd is not GET_FREE
    BAD_FLAGS = "chunk-flags"              # a flag other than DONE
    NO_ROUND = "chunk-no-round"            # no request was ever made
    UNKNOWN_ID = "chunk-unknown-id"        # an id the device never issued (0 included)
    STALE_ID = "chunk-stale-id"            # the id of an earlier round
    ROUND_CLOSED = "chunk-round-closed"    # the round already ended (DONE or ABORTED)
    PAGE_SHIFT = "chunk-page-shift"        # page_shift differs from the request's
    UNALIGNED = "chunk-start-unaligned"    # start_pfn not a multiple of 64
    TOO_LONG = "chunk-too-long"            # nr_pfns above MAX_CHUNK_PFNS
    OUT_OF_RANGE = "chunk-pfn-range"       # start_pfn + nr_pfns past the pfn space
    LENGTH = "chunk-length"                # bitmap bytes != 8 * ceil(nr_pfns / 64)

    @property
    def merged(self) -> bool:
        return self in (Verdict.ACCEPTED, Verdict.DONE)


@dataclass(eq=False)
class Round:
    """One free-page round of either kind -- a bitmap-queue round (``kind="bitmap"``, its id a
    request id) or a free page hint round (``kind="hint"``, its id a cmd_id): its map, where
    it is in the state machine (one :class:`RoundState` for both kinds), and counters.

    A round ends exactly once (:meth:`end`): DONE and ABORTED are final.
    """

    id: int
    map: FreePageMap
    requested_at: float
    kind: str = "bitmap"
    state: RoundState = RoundState.REQUESTED
    last_activity: float = 0.0
    finished_at: float | None = None
    abort_reason: str | None = None
    chunks: int = 0                                      # chunks merged (bitmap rounds)
    hints: int = 0                                       # hinted blocks (hint rounds)
    dropped: Counter[Verdict] = field(default_factory=Counter)   # chunks with this id, dropped

    def __post_init__(self) -> None:
        if isinstance(self.state, str):
            self.state = RoundState(self.state)
        if self.kind not in ("bitmap", "hint"):
            raise ConfigError("round-kind", f"unknown round kind {self.kind!r}")
        self.last_activity = self.last_activity or self.requested_at

    @property
    def request(self) -> bytes:
        """The 16 bytes the device writes into the driver's request buffer (§4.1)."""
        return REQUEST.pack(CMD_GET_FREE, PAGE_SHIFT, 0, self.id)

    @property
    def active(self) -> bool:
        return self.state in (RoundState.REQUESTED, RoundState.RECEIVING)

    @property
    def complete(self) -> bool:
        """The driver said DONE (STOP for hints).  Coverage may still be < 1 (dropped chunks,
        skipped ranges)."""
        return self.state is RoundState.DONE

    def end(self, state: RoundState, now: float, reason: str | None = None) -> bool:
        """Move an active round to DONE or ABORTED (with ``reason``); True if it was active,
        False (and nothing changes) if it had already ended."""
        if not self.active:
            return False
        assert state in (RoundState.DONE, RoundState.ABORTED)
        self.state, self.finished_at = state, now
        if state is RoundState.ABORTED:
            self.abort_reason = reason
        # An ended round's map no longer changes: keep it as runs, not bitmaps.
        self.map.compact()
        return True


def HintRound(id: int, map: FreePageMap, requested_at: float, state: RoundState | str =
              RoundState.REQUESTED) -> Round:
    """A free page hint round (VIRTIO 1.2 §5.5.6.4): a :class:`Round` of kind "hint"."""
    return Round(id, map, requested_at, kind="hint", state=RoundState(state))


class BitmapRounds:
    """The device side of the bitmap queue's rounds: ids, state, chunk validation (§4-§6).

    ``layout`` is the guest RAM as for :class:`FreePageMap`.  Ids start at ``first_id``
    (never 0) and only grow, so a chunk's id tells stale (issued before) from unknown (never
    issued).  The consumer must start dirty tracking *before* :meth:`request` (§7).
    """

    def __init__(self, layout: Iterable[tuple[int, int]], *, first_id: int = 1,
                 idle_timeout: float = ROUND_IDLE_TIMEOUT) -> None:
        if check_int("first_id", first_id) == 0:
            raise ConfigError("fpmap-argument", "request id 0 is reserved")
        self.layout = list(layout)
        ram_extents(self.layout)                # refuse a bad layout now, not at a request
        self.idle_timeout = idle_timeout
        self.current: Round | None = None
        self.dropped: Counter[Verdict] = Counter()     # every dropped chain, any id
        self._first_id = self._next_id = first_id
        #: the request id in the last chain's header (None: no header could be read)
        self.last_chunk_id: int | None = None

    @property
    def state(self) -> RoundState:
        return RoundState.IDLE if self.current is None else self.current.state

    def request(self, now: float) -> Round:
        """Start a round: aborts the active one ("superseded"), allocates a fresh map.

        Write ``round.request`` into the driver's oldest posted request buffer and use it.
        """
        self.abort("superseded", now)
        rnd = Round(self._next_id, FreePageMap(self.layout), now)
        self._next_id += 1
        self.current = rnd
        return rnd

    def abort(self, reason: str, now: float) -> bool:
        """End the active round, if any, keeping what it merged (its coverage says how much).
        True if a round ended here."""
        rnd = self.current
        return rnd is not None and rnd.end(RoundState.ABORTED, now, reason)

    def set_layout(self, layout: Iterable[tuple[int, int]], now: float) -> bool:
        """The guest's memory changed: abort the active round; later rounds use ``layout``.
        An identical layout is no change (§5): nothing happens.  True if a round ended."""
        layout = list(layout)
        ram_extents(layout)
        if layout == self.layout:
            return False
        self.layout = layout
        return self.abort("memory-changed", now)

    @property
    def next_id(self) -> int:
        """The request id the next :meth:`request` will issue."""
        return self._next_id

    def next_deadline(self) -> float | None:
        """When the active round times out if no chunk comes (None: no active round)."""
        rnd = self.current
        return rnd.last_activity + self.idle_timeout if rnd is not None and rnd.active else None

    def expire(self, now: float) -> bool:
        """Abort the active round if it has been idle for ``idle_timeout``; True if it was."""
        rnd = self.current
        if rnd is not None and rnd.active and now - rnd.last_activity >= self.idle_timeout:
            return self.abort("timeout", now)
        return False

    def receive(self, readable: Sequence[Any], writable_len: int = 0, *,
                now: float) -> Verdict:
        """Validate one chunk chain and merge it into the current round's map (§6).

        ``readable`` are the chain's device-readable buffers in order (memoryviews of guest
        memory), ``writable_len`` the total length of its device-writable ones.  A chain with
        only writable descriptors is a request buffer (§4.1), not a chunk: route it before.
        Descriptor boundaries do not matter (VIRTIO 1.2 §2.6.4): the readable bytes are one
        stream, header then bitmap.  Whatever the verdict, the device then uses the chain
        with length 0.  Only merged chunks change anything but counters.
        """
        try:
            spans = [ffi.from_buffer("uint8_t[]", b) for b in readable]
        except (TypeError, ValueError, BufferError) as e:
            raise ConfigError("fpmap-buffer", f"chain buffers must be contiguous: {e}") from None
        return self.receive_spans(ffi.new("uint8_t *[]", spans),
                                  ffi.new("size_t[]", [len(p) for p in spans]), len(spans),
                                  writable_len, now=now)

    def receive_spans(self, ptrs: Any, lens: Any, n: int, writable_len: int = 0, *,
                      now: float) -> Verdict:
        """:meth:`receive` for ``n`` readable buffers given as cffi arrays: ``uint8_t *[]``
        pointers and ``size_t[]`` lengths, which this call may adjust.

        The device's path: its chain walk has already checked that each ``lens[i]`` bytes at
        ``ptrs[i]`` lie in guest memory, and hands them over without a memoryview each.
        """
        verdict, hdr = self._check(ptrs, lens, n, writable_len)
        self.last_chunk_id = None if hdr is None else int(hdr.id)
        rnd = self.current
        if not verdict.merged:
            self.dropped[verdict] += 1
            if hdr is not None and rnd is not None and hdr.id == rnd.id:
                rnd.dropped[verdict] += 1
            return verdict
        assert rnd is not None and hdr is not None
        self._merge(rnd.map, ptrs, lens, n, hdr.start_pfn, hdr.nr_pfns)
        rnd.chunks += 1
        rnd.last_activity = now
        if verdict is Verdict.DONE:
            rnd.end(RoundState.DONE, now)
        else:
            rnd.state = RoundState.RECEIVING
        return verdict

    def _check(self, ptrs: Any, lens: Any, n: int,
               writable_len: int) -> tuple[Verdict, Any]:
        if writable_len:
            return Verdict.WRITABLE, None
        sizes = ffi.unpack(lens, n)
        total = sum(sizes)
        if total < HDR_SIZE:
            return Verdict.SHORT_HEADER, None
        head = b""
        for i, size in enumerate(sizes):     # one copy: the guest may rewrite it meanwhile
            head += ffi.buffer(ptrs[i], min(size, HDR_SIZE - len(head)))[:]
            if len(head) == HDR_SIZE:
                break
        hdr = CHUNK_HEADER.unpack(head)
        rnd = self.current
        if hdr.cmd != CMD_GET_FREE:
            return Verdict.BAD_CMD, hdr
        if hdr.flags & ~F_DONE:
            return Verdict.BAD_FLAGS, hdr
        if rnd is None:
            return Verdict.NO_ROUND, hdr
        if not self._first_id <= hdr.id < self._next_id:
            return Verdict.UNKNOWN_ID, hdr
        if hdr.id != rnd.id:
            return Verdict.STALE_ID, hdr
        if not rnd.active:
            return Verdict.ROUND_CLOSED, hdr
        if hdr.page_shift != PAGE_SHIFT:
            return Verdict.PAGE_SHIFT, hdr
        if hdr.start_pfn % PFN_ALIGN:
            return Verdict.UNALIGNED, hdr
        if hdr.nr_pfns > MAX_CHUNK_PFNS:
            return Verdict.TOO_LONG, hdr
        if hdr.start_pfn + hdr.nr_pfns > rnd.map.max_pfn:
            return Verdict.OUT_OF_RANGE, hdr
        if total - HDR_SIZE != (hdr.nr_pfns + 63) // 64 * 8:
            return Verdict.LENGTH, hdr
        return (Verdict.DONE if hdr.flags & F_DONE else Verdict.ACCEPTED), hdr

    @staticmethod
    def _merge(fpm: FreePageMap, ptrs: Any, lens: Any, n: int, start_pfn: int,
               nr_pfns: int) -> None:
        """OR the bitmap (the readable bytes after the header) in: skip the header by moving
        the first spans' pointers and lengths in place, then one C call for all spans."""
        k, skip = 0, HDR_SIZE
        while skip >= lens[k]:
            skip -= lens[k]
            k += 1
            if k == n:               # no bitmap bytes at all (nr_pfns == 0)
                return fpm.or_spans(start_pfn, ptrs, lens, 0, nr_pfns)
        ptrs[k] += skip
        lens[k] -= skip
        fpm.or_spans(start_pfn, ptrs + k, lens + k, n - k, nr_pfns)
