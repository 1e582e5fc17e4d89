"""The virtio-balloon device (virtio id 5; VIRTIO 1.2 §5.5): small parts, one per queue role.

==============  ==============================================================
``config``      config space: the target, the driver's ``actual``, cmd_id, poison_val
``inflate``     the inflate and deflate queues; the ballooned pages; discard
``stats``       the statistics queue and its periodic request
``hint``        free page hint rounds
``bitmap``      the free-page-bitmap queue: request buffers, chunks
``reporting``   free page reporting
``rounds``      the registry of the last rounds of both kinds, for queries
==============  ==============================================================

Queue roles follow the *negotiated* features, compacted as Linux and QEMU number them:
inflate, deflate, [stats], [free page hint], [reporting], [bitmap]; :meth:`Balloon.process`
dispatches a kick from a table by role.

Host memory reclaim: inflated pages and reported free pages are discarded from the guest RAM
file (:meth:`GuestMemory.discard`, one call per contiguous range).  Hinted pages never are: the
guest may take them back at any moment (the spec lets the driver reuse them before the device
is done), so a hint only means something together with dirty tracking.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import numpy as np

from vballoon.devices.balloon.bitmap import BitmapQueue
from vballoon.devices.balloon.config import ConfigSpace
from vballoon.devices.balloon.context import Counters
from vballoon.devices.balloon.events import RoundEnded, RoundStarted, Stats
from vballoon.devices.balloon.hint import HintQueue
from vballoon.devices.balloon.inflate import InflateDeflate, pfn_runs
from vballoon.devices.balloon.reporting import ReportingQueue, merge_runs
from vballoon.devices.balloon.rounds import ROUNDS_KEPT, RoundRegistry
from vballoon.devices.balloon.stats import STAT_NAMES, StatsQueue
from vballoon.errors import ConfigError
from vballoon.units import FRAME as PAGE, FRAME_SHIFT as PFN_SHIFT
from vballoon.fpmap import BitmapRounds, Round
from vballoon.virtio.device import Device, GuestLog
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import VirtQueue
from vballoon.wire import C

__all__ = ["Balloon", "Counters", "FEATURE_NAMES", "PAGE", "PFN_SHIFT", "ROUNDS_KEPT",
           "STAT_NAMES", "Stats", "merge_runs", "pfn_runs", "queue_roles"]

log = logging.getLogger(__name__)

FEATURE_NAMES = {
    "must-tell-host": C.VIRTIO_BALLOON_F_MUST_TELL_HOST,
    "stats": C.VIRTIO_BALLOON_F_STATS_VQ,
    "deflate-on-oom": C.VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    "free-page-hint": C.VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    "page-poison": C.VIRTIO_BALLOON_F_PAGE_POISON,
    "free-page-reporting": C.VIRTIO_BALLOON_F_PAGE_REPORTING,
    "free-page-bitmap": C.VIRTIO_BALLOON_F_FREE_PAGE_BITMAP,
}


def queue_roles(features: int) -> list[str]:
    """The balloon's queues, in index order, for the negotiated ``features``: absent optional
    queues take no index (Linux's init_vqs since 5.0, QEMU)."""
    roles = ["inflate", "deflate"]
    for bit, role in ((C.VIRTIO_BALLOON_F_STATS_VQ, "stats"),
                      (C.VIRTIO_BALLOON_F_FREE_PAGE_HINT, "hint"),
                      (C.VIRTIO_BALLOON_F_PAGE_REPORTING, "reporting"),
                      (C.VIRTIO_BALLOON_F_FREE_PAGE_BITMAP, "bitmap")):
        if features >> bit & 1:
            roles.append(role)
    return roles


class Balloon(Device):
    """The balloon: its parts, composed.  ``features``: the names of :data:`FEATURE_NAMES` to
    offer (all by default); ``stats_interval``: seconds between stats requests (0: never)."""

    device_id = C.VIRTIO_ID_BALLOON

    def __init__(self, features: Iterable[str] | None = None, *, stats_interval: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        names = FEATURE_NAMES.keys() if features is None else list(features)
        unknown = set(names) - FEATURE_NAMES.keys()
        if unknown:
            raise ConfigError("unknown-feature", f"unknown balloon feature(s): "
                              f"{', '.join(sorted(unknown))}")
        self._device_features = 0
        for n in names:
            self._device_features |= 1 << FEATURE_NAMES[n]
        self.glog = GuestLog(logging.getLogger("vballoon.devices.balloon"))
        self.mem: GuestMemory | None = None
        self.counters = Counters()
        self.rounds = RoundRegistry()
        self.config = ConfigSpace(self)
        self.inflate = InflateDeflate(self)
        self.stats_queue = StatsQueue(self, stats_interval)
        self.hint = HintQueue(self)
        self.bitmap_queue = BitmapQueue(self)
        self.reporting = ReportingQueue(self)
        self.handlers = {
            "inflate": self.inflate.process_inflate,
            "deflate": self.inflate.process_deflate,
            "stats": self.stats_queue.process,
            "hint": self.hint.process,
            "reporting": self.reporting.process,
            "bitmap": self.bitmap_queue.process,
        }

    # -- negotiation ----------------------------------------------------------------------

    def device_features(self) -> int:
        return self._device_features

    def queue_roles(self, features: int) -> list[str]:
        return queue_roles(features)

    def max_queues(self) -> int:
        # GET_QUEUE_NUM: stats is always counted (QEMU's num_vqs default assumes it).
        return 3 + sum(bool(self._device_features >> b & 1) for b in
                       (C.VIRTIO_BALLOON_F_FREE_PAGE_HINT, C.VIRTIO_BALLOON_F_PAGE_REPORTING,
                        C.VIRTIO_BALLOON_F_FREE_PAGE_BITMAP))

    def set_features(self, acked: int) -> None:
        super().set_features(acked)
        log.info("features acked %#x; queues: %s", acked,
                 ", ".join(f"{i}={r}" for i, r in self.roles.items()))

    # -- config space ---------------------------------------------------------------------

    def get_config(self) -> bytes:
        return self.config.get()

    def set_config(self, offset: int, data: bytes, migration: bool) -> None:
        self.config.set(offset, data, migration)

    def set_target(self, num_pages: int) -> None:
        """Ask the guest to hold ``num_pages`` 4 KiB pages in the balloon."""
        self.config.set_target(num_pages, self.ram_pages)

    num_pages = property(lambda self: self.config.num_pages,
                         lambda self, v: setattr(self.config, "num_pages", v),
                         doc="the target: pages the guest is asked to hold in the balloon")
    actual = property(lambda self: self.config.actual,
                      doc="pages in the balloon, by the driver's count")
    cmd_id = property(lambda self: self.config.cmd_id,
                      doc="the free page hint cmd_id in config space")
    poison_val = property(lambda self: self.config.poison_val,
                          doc="the driver's poison value (reported pages are kept if non-zero)")

    @property
    def ram_pages(self) -> int:
        return 0 if self.mem is None else sum(s for _, s in self.mem.ram_ranges) >> PFN_SHIFT

    # -- public accessors for the layers above -------------------------------------------

    @property
    def stats(self) -> Stats:
        """The driver's latest statistics."""
        return self.stats_queue.stats

    @property
    def inflated(self):
        """The set of pages in the balloon (:class:`~.inflate.PageSet`)."""
        return self.inflate.pages

    def ballooned_bitmap(self, max_pfn: int | None = None) -> np.ndarray:
        """The pages in the balloon as a new uint8 bitmap over ``[0, max_pfn)``, bit p = pfn p
        (for exports and pictures)."""
        return self.inflate.pages.bitmap(max_pfn)

    @property
    def queue_names(self) -> list[str]:
        """The roles of the negotiated queues, in index order."""
        return [self.roles[i] for i in sorted(self.roles)]

    @property
    def hint_round(self) -> Round | None:
        return self.hint.current

    @property
    def bitmap(self) -> BitmapRounds | None:
        """The bitmap queue's round protocol (None until the memory table is known)."""
        return self.bitmap_queue.rounds

    @property
    def bitmap_requests_held(self) -> int:
        """Request buffers the driver posted on the bitmap queue that the device still holds."""
        return len(self.bitmap_queue.buffers)

    # -- life cycle -----------------------------------------------------------------------

    def memory_changed(self, mem: GuestMemory | None) -> None:
        self.mem = mem
        self.inflate.memory_changed(mem)
        self.bitmap_queue.memory_changed(mem)

    def queue_stopped(self, vq: VirtQueue) -> None:
        self.stats_queue.queue_stopped(vq)
        self.bitmap_queue.queue_stopped(vq)

    def reset(self) -> None:
        super().reset()
        self.config.poison_val = 0
        self.driver_restarted()

    def driver_restarted(self) -> None:
        # A new driver starts with an empty balloon and actual = 0 (its pages were the old
        # guest's); the target stays.  poison_val and the queue roles are the new driver's.
        self.stats_queue.forget()
        self.bitmap_queue.driver_restarted()
        self.hint.abort("reset")
        self.config.driver_restarted()
        self.inflate.driver_restarted()

    def discard(self, mem: GuestMemory, runs: tuple[np.ndarray, np.ndarray]) -> int:
        """Discard ``(first pfn, npages)`` runs from host memory; returns bytes discarded.
        The one place inflate and reporting give memory back (a hook for benchmarks)."""
        starts, counts = runs
        try:
            calls, done = mem.discard(starts.astype(np.uint64) << np.uint64(PFN_SHIFT),
                                      counts.astype(np.uint64) << np.uint64(PFN_SHIFT))
        except OSError as e:
            self.glog.error("discard-failed", "is guest RAM a shared memfd/file? %s", e)
            return 0
        self.counters.discard_calls += calls
        self.counters.discarded_bytes += done
        return done

    # -- stats -----------------------------------------------------------------------------

    def request_stats(self) -> bool:
        """Return the held stats buffer, which asks the driver for fresh stats (§5.5.6.3)."""
        return self.stats_queue.request()

    # -- rounds ----------------------------------------------------------------------------

    def start_round(self, kind: str = "auto") -> Round:
        """Ask the guest for its free pages.  ``kind``: "bitmap", "hint", or "auto" (the bitmap
        queue if the driver acked it, else free page hinting).

        The caller must already track dirty pages (the correctness contract,
        ``protocol/bitmap-queue.md`` §7).
        """
        if kind == "auto":
            kind = "bitmap" if "bitmap" in self.roles.values() else "hint"
        if kind == "bitmap":
            r = self.bitmap_queue.start()
        elif kind == "hint":
            r = self.hint.start()
        else:
            raise ConfigError("round-kind", f"unknown round kind {kind!r} (bitmap, hint, auto)")
        self.emit(RoundStarted(r))
        return r

    def start_hint_round(self) -> Round:
        return self.start_round("hint")

    def round_ended(self, r: Round) -> None:
        """A part ended round ``r`` (it does so once): tell the sink."""
        self.emit(RoundEnded(r))

    # -- time --------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        times = [t for t in (self.stats_queue.next_deadline(), self.hint.next_deadline(),
                             self.bitmap_queue.next_deadline()) if t is not None]
        return min(times, default=None)

    def handle_timer(self, now: float) -> None:
        self.bitmap_queue.handle_timer(now)
        self.hint.handle_timer(now)
        self.stats_queue.handle_timer(now)
