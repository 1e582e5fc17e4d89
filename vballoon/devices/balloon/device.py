"""The virtio-balloon device (virtio id 5; VIRTIO 1.2 §5.5), behind the vhost-user session.

Queue roles follow the *negotiated* features, compacted as Linux and QEMU number them:
inflate, deflate, [stats], [free page hint], [reporting], [bitmap] (shared/DESIGN.md).

Host memory reclaim: inflated pages and reported free pages are discarded from the guest RAM
file (:meth:`GuestMemory.discard`, one call per contiguous range).  Hinted pages never are: the
guest may take them back at any moment (the spec lets the driver reuse them before the device
is done), so a hint only means something together with dirty tracking.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from vballoon.virtio.device import Device
from vballoon.errors import ConfigError, GuestError
from vballoon.fpmap import BitmapRounds, FreePageMap, Round, Verdict
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import Chain, VirtQueue
from vballoon.wire import BALLOON_CONFIG, BALLOON_STAT, C, LE32

log = logging.getLogger(__name__)

PFN_SHIFT = C.VIRTIO_BALLOON_PFN_SHIFT
PAGE = 1 << PFN_SHIFT
STAT_NAMES = {
    C.VIRTIO_BALLOON_S_SWAP_IN: "swap-in", C.VIRTIO_BALLOON_S_SWAP_OUT: "swap-out",
    C.VIRTIO_BALLOON_S_MAJFLT: "major-faults", C.VIRTIO_BALLOON_S_MINFLT: "minor-faults",
    C.VIRTIO_BALLOON_S_MEMFREE: "free-memory", C.VIRTIO_BALLOON_S_MEMTOT: "total-memory",
    C.VIRTIO_BALLOON_S_AVAIL: "available-memory", C.VIRTIO_BALLOON_S_CACHES: "disk-caches",
    C.VIRTIO_BALLOON_S_HTLB_PGALLOC: "hugetlb-allocations",
    C.VIRTIO_BALLOON_S_HTLB_PGFAIL: "hugetlb-failures",
    C.VIRTIO_BALLOON_S_OOM_KILL: "oom-kills", C.VIRTIO_BALLOON_S_ALLOC_STALL: "alloc-stalls",
    C.VIRTIO_BALLOON_S_ASYNC_SCAN: "async-scans", C.VIRTIO_BALLOON_S_DIRECT_SCAN: "direct-scans",
    C.VIRTIO_BALLOON_S_ASYNC_RECLAIM: "async-reclaims",
    C.VIRTIO_BALLOON_S_DIRECT_RECLAIM: "direct-reclaims",
}   # names as QEMU's guest-stats QOM property uses them ("stat-free-memory" minus "stat-")
FEATURE_NAMES = {
    "must-tell-host": C.VIRTIO_BALLOON_F_MUST_TELL_HOST,
    "stats": C.VIRTIO_BALLOON_F_STATS_VQ,
    "deflate-on-oom": C.VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    "free-page-hint": C.VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    "page-poison": C.VIRTIO_BALLOON_F_PAGE_POISON,
    "free-page-reporting": C.VIRTIO_BALLOON_F_PAGE_REPORTING,
    "free-page-bitmap": C.VIRTIO_BALLOON_F_FREE_PAGE_BITMAP,
}
HINT_CMD_ID_MIN = 0x80000000    # as QEMU: far from STOP (0) and DONE (1)
HINT_ROUND_TIMEOUT = 30.0       # seconds a hint round may stay open before DONE is forced
ROUNDS_KEPT = 4                 # rounds kept for queries and exports (2 bitmaps of max_pfn bits each)


@dataclass
class Stats:
    values: dict[str, int] = field(default_factory=dict)
    updated: float | None = None         # wall-clock time of the last update
    count: int = 0


@dataclass
class Counters:
    inflated_pages: int = 0              # pages in the balloon now (by the device's own count)
    reported_bytes: int = 0
    discarded_bytes: int = 0
    discard_calls: int = 0
    hinted_bytes: int = 0


@dataclass(eq=False)
class HintRound:
    """One FREE_PAGE_HINT round (VIRTIO 1.2 §5.5.6.4): its cmd_id and the map of its hints.

    States: requested -> receiving -> done (the driver said STOP) or aborted (a new round, a
    reset, a timeout).  Hinted blocks are marked free *and covered* in ``map``; nothing else is
    covered, since a hint round says nothing about pages it did not hint.
    """

    id: int
    map: FreePageMap
    requested_at: float
    state: str = "requested"
    finished_at: float | None = None
    abort_reason: str | None = None
    hints: int = 0

    @property
    def active(self) -> bool:
        return self.state in ("requested", "receiving")

    @property
    def complete(self) -> bool:
        return self.state == "done"


def queue_roles(features: int) -> list[str]:
    """The balloon's queues, in index order, for the negotiated ``features``: absent optional
    queues take no index (Linux's init_vqs since 5.0, QEMU; balloon-lineage.md §3.3)."""
    roles = ["inflate", "deflate"]
    for bit, role in ((C.VIRTIO_BALLOON_F_STATS_VQ, "stats"),
                      (C.VIRTIO_BALLOON_F_FREE_PAGE_HINT, "hint"),
                      (C.VIRTIO_BALLOON_F_PAGE_REPORTING, "reporting"),
                      (C.VIRTIO_BALLOON_F_FREE_PAGE_BITMAP, "bitmap")):
        if features >> bit & 1:
            roles.append(role)
    return roles


def round_kind(r: "Round | HintRound") -> str:
    return "hint" if isinstance(r, HintRound) else "bitmap"


def round_state(r: "Round | HintRound") -> str:
    return r.state if isinstance(r, HintRound) else r.state.value


class Balloon(Device):
    device_id = C.VIRTIO_ID_BALLOON

    def __init__(self, features: Iterable[str] | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        names = FEATURE_NAMES.keys() if features is None else list(features)
        unknown = set(names) - FEATURE_NAMES.keys()
        if unknown:
            raise ConfigError("unknown-feature", f"unknown balloon feature(s): "
                              f"{', '.join(sorted(unknown))}")
        self.offered = 1 << C.VIRTIO_F_VERSION_1 | 1 << C.VIRTIO_RING_F_EVENT_IDX \
            | 1 << C.VIRTIO_RING_F_INDIRECT_DESC
        for n in names:
            self.offered |= 1 << FEATURE_NAMES[n]
        self.clock = clock
        self.num_pages = 0
        self.actual = 0
        self.cmd_id = 0
        self.poison_val = 0
        self._exposed_num_pages: deque[int] = deque([0], maxlen=8)
        self._exposed_cmd_ids: deque[int] = deque([0], maxlen=8)
        self.roles: dict[int, str] = {}
        self.mem: GuestMemory | None = None
        self.inflated = np.zeros(0, dtype=np.uint8)      # bitmap, bit p = pfn p in the balloon
        self.counters = Counters()
        self.stats = Stats()
        self._stats_chain: Chain | None = None
        self._stats_vq: VirtQueue | None = None
        self.hint_round: HintRound | None = None
        self._next_cmd_id = HINT_CMD_ID_MIN
        self.bitmap: BitmapRounds | None = None          # made when the memory table is known
        self._bitmap_req: tuple[VirtQueue, Chain] | None = None   # the driver's request buffer
        self._bitmap_pending: Round | None = None         # requested before a buffer was posted
        self.rounds: dict[int, Round | HintRound] = {}    # by id, the last ROUNDS_KEPT
        #: called with "actual", "stats", or ("round", round) when a round ends
        self.on_change: Callable[..., None] = lambda *what: None

    # -- negotiation ----------------------------------------------------------------------

    def has(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def features(self) -> int:
        return self.offered

    def max_queues(self) -> int:
        return 3 + sum(bool(self.offered >> b & 1) for b in
                       (C.VIRTIO_BALLOON_F_FREE_PAGE_HINT, C.VIRTIO_BALLOON_F_PAGE_REPORTING,
                        C.VIRTIO_BALLOON_F_FREE_PAGE_BITMAP))

    def set_features(self, acked: int) -> None:
        super().set_features(acked)
        self.roles = dict(enumerate(queue_roles(acked)))
        log.info("features acked %#x; queues: %s", acked,
                 ", ".join(f"{i}={r}" for i, r in self.roles.items()))

    # -- config space ---------------------------------------------------------------------

    def get_config(self) -> bytes:
        return BALLOON_CONFIG.pack(self.num_pages, self.actual, self.cmd_id, self.poison_val)

    def set_config(self, offset: int, data: bytes, migration: bool) -> None:
        new = bytearray(self.get_config())
        new[offset:offset + len(data)] = data
        cfg = BALLOON_CONFIG.unpack(bytes(new))
        if migration:      # the front-end restores the whole config on the destination
            self.num_pages, self.cmd_id = cfg.num_pages, cfg.free_page_hint_cmd_id
        else:
            # QEMU writes back the whole config as it last read it, so an old num_pages or
            # cmd_id is the driver's stale copy, not a write; anything else is refused.
            for name, value, exposed in (("num_pages", cfg.num_pages, self._exposed_num_pages),
                                         ("free_page_hint_cmd_id", cfg.free_page_hint_cmd_id,
                                          self._exposed_cmd_ids)):
                if value not in exposed:
                    log.error("config-readonly-field: the driver wrote %s=%#x; ignored", name,
                              value)
        if cfg.poison_val != self.poison_val:
            self.poison_val = cfg.poison_val
            log.info("poison_val = %#x", self.poison_val)
        if cfg.actual != self.actual:
            self.actual = cfg.actual
            self.on_change("actual")

    def set_target(self, num_pages: int) -> None:
        """Ask the guest to hold ``num_pages`` 4 KiB pages in the balloon."""
        if not 0 <= num_pages <= 0xFFFFFFFF:
            raise ConfigError("target-range", f"target {num_pages} pages is not a le32")
        ram = self.ram_pages
        if ram and num_pages > ram:
            raise ConfigError("target-range", f"target {num_pages} pages exceeds guest RAM "
                              f"({ram} pages)")
        self.num_pages = num_pages
        self._exposed_num_pages.append(num_pages)
        self.config_changed()

    @property
    def ram_pages(self) -> int:
        return 0 if self.mem is None else sum(s for _, s in self.mem.ram_ranges) >> PFN_SHIFT

    # -- queues ---------------------------------------------------------------------------

    def memory_changed(self, mem: GuestMemory | None) -> None:
        self.mem = mem
        if mem is not None:
            if self.bitmap is None:
                self.bitmap = BitmapRounds(mem.ram_ranges, first_id=self._next_bitmap_id())
            elif self.bitmap.layout != mem.ram_ranges:
                self.bitmap.set_layout(mem.ram_ranges, self.clock())
                self._round_ended(self.bitmap.current)
            end = max((g + s for g, s in mem.ram_ranges), default=0) >> PFN_SHIFT
            if self.inflated.size * 8 < end:
                grown = np.zeros((end + 7) // 8, dtype=np.uint8)
                grown[:self.inflated.size] = self.inflated
                self.inflated = grown

    def queue_stopped(self, vq: VirtQueue) -> None:
        if vq is self._stats_vq:
            self._stats_chain, self._stats_vq = None, None
        if self._bitmap_req is not None and self._bitmap_req[0] is vq:
            self._bitmap_req = None

    def reset(self) -> None:
        super().reset()
        self.roles = {}
        self.poison_val = 0
        self.driver_restarted()

    def driver_restarted(self) -> None:
        # A new driver starts with an empty balloon and actual = 0 (its pages were the old
        # guest's); the target stays.  poison_val and the queue roles are the new driver's.
        self._stats_chain = self._stats_vq = None
        self._bitmap_req = self._bitmap_pending = None
        self._abort_hint_round("reset")
        if self.bitmap is not None:
            self.bitmap.abort("reset", self.clock())
            self._round_ended(self.bitmap.current)
        self.cmd_id = 0
        self.actual = 0
        self.inflated[:] = 0
        self.counters.inflated_pages = 0

    def process(self, vq: VirtQueue, mem: GuestMemory) -> None:
        role = self.roles.get(vq.index)
        if role is None:
            raise GuestError("queue-unused", f"queue {vq.index} has no role with the "
                             f"negotiated features {self.acked_features:#x}")
        getattr(self, f"_process_{role}")(vq, mem)

    def _chains(self, vq: VirtQueue, mem: GuestMemory) -> Iterable[Chain]:
        while (chain := vq.pop(mem)) is not None:
            yield chain

    # inflate / deflate (§5.5.6.2)

    def _pfns(self, vq: VirtQueue, mem: GuestMemory, chain: Chain, role: str) -> np.ndarray:
        """The valid le32 PFNs of an inflate/deflate buffer (invalid ones logged, dropped)."""
        if chain.writable:
            log.error("%s-wrong-direction: queue %d chain %d has device-writable buffers; "
                      "ignored", role, vq.index, chain.head)
            return np.zeros(0, dtype=np.uint32)
        data = chain.read(mem, limit=1 << 16)
        if len(data) % 4:
            log.error("%s-length: queue %d chain %d is %d bytes, not a multiple of 4; ignored",
                      role, vq.index, chain.head, len(data))
            return np.zeros(0, dtype=np.uint32)
        pfns = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        ok = self._valid_pfns(pfns)
        if not ok.all():
            bad = pfns[~ok]
            log.error("%s-pfn-outside-ram: %d pfn(s) outside guest RAM (first %#x); ignored",
                      role, bad.size, int(bad[0]))
            pfns = pfns[ok]
        return pfns

    def _valid_pfns(self, pfns: np.ndarray) -> np.ndarray:
        ok = np.zeros(pfns.shape, dtype=bool)
        assert self.mem is not None
        for gpa, size in self.mem.ram_ranges:
            ok |= (pfns >= gpa >> PFN_SHIFT) & (pfns < (gpa + size) >> PFN_SHIFT)
        return ok

    def _test_and_set(self, pfns: np.ndarray, value: bool) -> np.ndarray:
        """Set (or clear) pfns in the inflated bitmap; returns those whose bit changed."""
        pfns = np.unique(pfns)
        byte, bit = pfns >> 3, (1 << (pfns & 7)).astype(np.uint8)
        was = (self.inflated[byte] & bit) != 0
        changed = pfns[was != value]
        byte, bit = changed >> 3, (1 << (changed & 7)).astype(np.uint8)
        if value:
            np.bitwise_or.at(self.inflated, byte, bit)
        else:
            np.bitwise_and.at(self.inflated, byte, ~bit)
        return changed

    def _process_inflate(self, vq: VirtQueue, mem: GuestMemory) -> None:
        chains, new = [], []
        for chain in self._chains(vq, mem):
            chains.append(chain)
            new.append(self._test_and_set(self._pfns(vq, mem, chain, "inflate"), True))
        pfns = np.concatenate(new) if new else np.zeros(0, dtype=np.uint32)
        self.counters.inflated_pages += int(pfns.size)
        # The device MAY modify an inflated page once it has seen the PFN (§5.5.6.2.1):
        # discard before the buffers are returned.
        self._discard(mem, pfn_runs(pfns))
        for chain in chains:
            vq.push(chain, 0)

    def _process_deflate(self, vq: VirtQueue, mem: GuestMemory) -> None:
        for chain in self._chains(vq, mem):
            pfns = self._pfns(vq, mem, chain, "deflate")
            gone = self._test_and_set(pfns, False)
            if gone.size != np.unique(pfns).size:
                log.warning("deflate-not-inflated: %d pfn(s) deflated that were not in the "
                            "balloon", np.unique(pfns).size - gone.size)
            self.counters.inflated_pages -= int(gone.size)
            vq.push(chain, 0)

    def _discard(self, mem: GuestMemory, runs: tuple[np.ndarray, np.ndarray]) -> int:
        """Discard (first pfn, npages) runs from host memory; returns bytes discarded."""
        starts, counts = runs
        try:
            calls, done = mem.discard(starts.astype(np.uint64) << np.uint64(PFN_SHIFT),
                                      counts.astype(np.uint64) << np.uint64(PFN_SHIFT))
        except OSError as e:
            log.error("discard failed (is guest RAM a shared memfd/file?): %s", e)
            return 0
        self.counters.discard_calls += calls
        self.counters.discarded_bytes += done
        return done

    # stats (§5.5.6.3)

    def _process_stats(self, vq: VirtQueue, mem: GuestMemory) -> None:
        for chain in self._chains(vq, mem):
            if self._stats_chain is not None:
                log.error("stats-extra-buffer: queue %d: a second stats buffer while one is "
                          "held; the old one is returned", vq.index)
                vq.push(self._stats_chain, 0)
            if chain.writable:
                log.error("stats-wrong-direction: queue %d chain %d has device-writable "
                          "buffers; returned", vq.index, chain.head)
                vq.push(chain, 0)
                self._stats_chain = None
                continue
            self._parse_stats(chain.read(mem, limit=4096))
            chain.forget_hosts()
            self._stats_chain, self._stats_vq = chain, vq

    def _parse_stats(self, data: bytes) -> None:
        whole = len(data) - len(data) % BALLOON_STAT.size
        if whole != len(data):
            log.error("stats-truncated: %d bytes is not a whole number of 10-byte entries; "
                      "the trailing %d bytes are ignored", len(data), len(data) - whole)
        values = {}
        for off in range(0, whole, BALLOON_STAT.size):
            tag, val = BALLOON_STAT.struct.unpack_from(data, off)
            name = STAT_NAMES.get(tag)
            if name is not None:          # the device MUST ignore unknown tags
                values[name] = val
        self.stats = Stats(values, self.clock(), self.stats.count + 1)
        self.on_change("stats")

    def request_stats(self) -> bool:
        """Return the held stats buffer, which asks the driver for fresh stats (§5.5.6.3)."""
        if self._stats_chain is None or self._stats_vq is None:
            return False
        vq, chain = self._stats_vq, self._stats_chain
        self._stats_chain = None
        vq.push(chain, 0)
        self.notify(vq.index)
        return True

    # rounds: free page hinting and the bitmap queue ----------------------------------------

    def start_round(self, kind: str = "auto") -> "Round | HintRound":
        """Ask the guest for its free pages.  ``kind``: "bitmap", "hint", or "auto" (the bitmap
        queue if the driver acked it, else free page hinting).

        The caller must already track dirty pages (shared/DESIGN.md, the correctness contract).
        """
        if kind == "auto":
            kind = "bitmap" if "bitmap" in self.roles.values() else "hint"
        if kind == "bitmap":
            return self._start_bitmap_round()
        if kind == "hint":
            return self.start_hint_round()
        raise ConfigError("round-kind", f"unknown round kind {kind!r} (bitmap, hint, auto)")

    def _remember(self, r: "Round | HintRound") -> None:
        self.rounds[r.id] = r
        while len(self.rounds) > ROUNDS_KEPT:
            del self.rounds[next(iter(self.rounds))]

    def _round_ended(self, r: "Round | HintRound | None") -> None:
        if r is not None and not r.active and r.finished_at is not None:
            self.on_change("round", r)

    def tick(self, now: float) -> None:
        """Time-based rules, called periodically: idle bitmap rounds and stale hint rounds end."""
        if self.bitmap is not None and self.bitmap.expire(now):
            self._round_ended(self.bitmap.current)
        r = self.hint_round
        if r is not None and r.active and now - r.requested_at >= HINT_ROUND_TIMEOUT:
            self._abort_hint_round("timeout")
            self._set_cmd_id(C.VIRTIO_BALLOON_CMD_ID_DONE)

    # free page hinting (§5.5.6.4)

    def start_hint_round(self) -> HintRound:
        if not self.has(C.VIRTIO_BALLOON_F_FREE_PAGE_HINT) or self.mem is None:
            raise ConfigError("hint-not-negotiated", "the driver did not ack FREE_PAGE_HINT")
        self._abort_hint_round("superseded")
        cmd_id = self._next_cmd_id
        self._next_cmd_id = HINT_CMD_ID_MIN if cmd_id == 0xFFFFFFFF else cmd_id + 1
        self.hint_round = HintRound(cmd_id, FreePageMap(self.mem.ram_ranges), self.clock())
        self._remember(self.hint_round)
        self._set_cmd_id(cmd_id)
        return self.hint_round

    def _abort_hint_round(self, reason: str) -> None:
        r = self.hint_round
        if r is not None and r.active:
            r.state, r.abort_reason, r.finished_at = "aborted", reason, self.clock()
            self._round_ended(r)

    def _set_cmd_id(self, cmd_id: int) -> None:
        self.cmd_id = cmd_id
        self._exposed_cmd_ids.append(cmd_id)
        self.config_changed()

    def _process_hint(self, vq: VirtQueue, mem: GuestMemory) -> None:
        r = self.hint_round
        stopped = False
        for chain in self._chains(vq, mem):
            if chain.readable and not chain.writable:
                data = chain.read(mem, limit=64)
                if len(data) != 4:
                    log.error("hint-cmd-length: queue %d: a %d-byte command buffer", vq.index,
                              len(data))
                else:
                    (cmd,) = LE32.unpack(data)
                    if cmd == C.VIRTIO_BALLOON_CMD_ID_STOP:
                        if r is not None and r.state == "receiving":
                            r.state, r.finished_at, stopped = "done", self.clock(), True
                    elif r is not None and cmd == r.id and r.state == "requested":
                        r.state = "receiving"
                    else:
                        log.warning("hint-stale-id: queue %d: cmd id %#x is not the current "
                                    "round's; ignored", vq.index, cmd)
            elif chain.writable and not chain.readable:
                if r is not None and r.state == "receiving" and self.cmd_id == r.id:
                    for b in chain.writable:
                        # Hints are whole 4 KiB frames; a partial frame is not free.
                        first, last = -(-b.addr // PAGE), (b.addr + b.len) // PAGE
                        if last > first:
                            try:
                                r.map.mark_free_range(first, last - first)
                            except ConfigError as e:
                                log.error("hint-outside-ram: queue %d: %s; ignored", vq.index, e)
                                continue
                            r.hints += 1
                            self.counters.hinted_bytes += (last - first) * PAGE
            else:
                log.error("hint-mixed-buffers: queue %d chain %d mixes directions; ignored",
                          vq.index, chain.head)
            vq.push(chain, 0)
        if stopped:
            assert r is not None
            self._round_ended(r)
            # Nothing here keeps the pages past the round (the map is ours): release them now.
            self._set_cmd_id(C.VIRTIO_BALLOON_CMD_ID_DONE)

    # the free-page-bitmap queue (protocol/bitmap-queue.md)

    def _next_bitmap_id(self) -> int:
        return max((r.id for r in self.rounds.values() if isinstance(r, Round)), default=0) + 1

    def _start_bitmap_round(self) -> Round:
        if "bitmap" not in self.roles.values() or self.bitmap is None:
            raise ConfigError("bitmap-not-negotiated",
                              "the driver did not ack VIRTIO_BALLOON_F_FREE_PAGE_BITMAP")
        previous = self.bitmap.current
        r = self.bitmap.request(self.clock())
        self._round_ended(previous)
        self._remember(r)
        self._bitmap_pending = r
        self._send_bitmap_request()
        return r

    def _send_bitmap_request(self) -> None:
        if self._bitmap_pending is None or self._bitmap_req is None:
            return       # sent when the driver posts its request buffer
        (vq, chain), r = self._bitmap_req, self._bitmap_pending
        self._bitmap_req = self._bitmap_pending = None
        assert self.mem is not None
        vq.push(chain, chain.write(self.mem, r.request))
        self.notify(vq.index)

    def _process_bitmap(self, vq: VirtQueue, mem: GuestMemory) -> None:
        assert self.bitmap is not None
        for chain in self._chains(vq, mem):
            if chain.nread == 0:                                # a request buffer (§4.1)
                if sum(chain.lens) < C.VIRTIO_BALLOON_BITMAP_REQ_SIZE:
                    log.error("bitmap-request-short: queue %d chain %d is shorter than a "
                              "request; returned", vq.index, chain.head)
                    vq.push(chain, 0)
                elif self._bitmap_req is not None:
                    log.error("bitmap-request-extra: queue %d: a second request buffer; "
                              "the first is returned unused", vq.index)
                    vq.push(self._bitmap_req[1], 0)
                    chain.forget_hosts()
                    self._bitmap_req = (vq, chain)
                else:
                    chain.forget_hosts()
                    self._bitmap_req = (vq, chain)
                continue
            current = self.bitmap.current
            ptrs, lens, n = chain.read_spans()
            verdict = self.bitmap.receive_spans(ptrs, lens, n, sum(chain.lens[n:]),
                                                now=self.clock())
            if not verdict.merged:
                log.warning("%s: queue %d chain %d dropped", verdict.value, vq.index, chain.head)
            vq.push(chain, 0)
            if verdict is Verdict.DONE:
                self._round_ended(current)
        self._send_bitmap_request()

    # free page reporting (§5.5.6.5)

    def _process_reporting(self, vq: VirtQueue, mem: GuestMemory) -> None:
        poisoned = self.poison_val != 0
        for chain in self._chains(vq, mem):
            if chain.readable:
                log.error("reporting-wrong-direction: queue %d chain %d has device-readable "
                          "buffers; nothing discarded", vq.index, chain.head)
                vq.push(chain, 0)
                continue
            runs = []
            for b in chain.writable:
                first, last = -(-b.addr // PAGE), (b.addr + b.len) // PAGE
                if last > first:
                    runs.append((first, last - first))
                self.counters.reported_bytes += b.len
            if not poisoned:      # discarded pages read back as 0, not poison_val
                self._discard(mem, merge_runs(runs))
            vq.push(chain, 0)


def pfn_runs(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique pfns -> (first pfn, count) of maximal contiguous runs, ascending."""
    p = np.sort(pfns.astype(np.int64))
    if p.size == 0:
        return p, p
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    first = np.concatenate(([0], breaks))
    return p[first], np.diff(np.concatenate((first, [p.size])))


def merge_runs(runs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Coalesce adjacent or overlapping (pfn, n) runs into (first pfn, count) arrays."""
    out: list[list[int]] = []
    for pfn, n in sorted(runs):
        if out and pfn <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], pfn + n - out[-1][0])
        else:
            out.append([pfn, n])
    arr = np.array(out, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]
