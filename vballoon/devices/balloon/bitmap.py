"""The free-page-bitmap queue (``protocol/bitmap-queue.md``, "the spec"): the driver's request
buffers, the chunks, and the rounds they belong to (:class:`vballoon.fpmap.BitmapRounds` does
the validation and the merge).

Request buffers (spec §4.1): the driver may keep several posted.  The device holds up to
:data:`MAX_REQUEST_BUFFERS` of them, in the order they were posted, and writes a round's
request into the oldest; a buffer posted beyond that bound is returned unused at once.  A
round's request is written only while the round is still REQUESTED: a round that ended before
any buffer was posted writes nothing into a buffer posted later.
"""
from __future__ import annotations

from collections import deque

from vballoon.devices.balloon.context import BalloonContext
from vballoon.errors import ConfigError
from vballoon.fpmap import BitmapRounds, Round, Verdict
from vballoon.fpmap.rounds import RoundState
from vballoon.virtio.device import ChainBatch
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import Chain, VirtQueue
from vballoon.wire import C


MAX_REQUEST_BUFFERS = 8          # request buffers held at once (spec §4.1)


class BitmapQueue:
    def __init__(self, dev: BalloonContext) -> None:
        self.dev = dev
        self.rounds: BitmapRounds | None = None         # made when the memory table is known
        self.buffers: deque[tuple[VirtQueue, Chain]] = deque()   # posted request buffers
        self.pending: Round | None = None               # requested before a buffer was posted

    @property
    def current(self) -> Round | None:
        return None if self.rounds is None else self.rounds.current

    def memory_changed(self, mem: GuestMemory | None) -> None:
        if mem is None:
            return
        if self.rounds is None:
            self.rounds = BitmapRounds(mem.ram_ranges, first_id=self.dev.rounds.next_bitmap_id)
        elif self.rounds.set_layout(mem.ram_ranges, self.dev.clock()):
            self._ended(self.rounds.current)

    def queue_stopped(self, vq: VirtQueue) -> None:
        self.buffers = deque(b for b in self.buffers if b[0] is not vq)

    def driver_restarted(self) -> None:
        self.buffers.clear()
        self.pending = None
        if self.rounds is not None and self.rounds.abort("reset", self.dev.clock()):
            self._ended(self.rounds.current)

    def _ended(self, r: Round | None) -> None:
        if r is not None:
            if r is self.pending:
                self.pending = None
            self.dev.round_ended(r)

    def start(self) -> Round:
        dev = self.dev
        if "bitmap" not in dev.roles.values() or self.rounds is None:
            raise ConfigError("bitmap-not-negotiated",
                              "the driver did not ack VIRTIO_BALLOON_F_FREE_PAGE_BITMAP")
        previous = self.rounds.current
        superseded = previous is not None and previous.active
        r = self.rounds.request(dev.clock())
        dev.rounds.remember(r)
        if superseded:
            self._ended(previous)
        self.pending = r
        self._send_request()
        return r

    def _send_request(self) -> None:
        r = self.pending
        if r is None:
            return
        if r.state is not RoundState.REQUESTED:
            self.pending = None          # it ended before a buffer came: nothing is written
            return
        if not self.buffers:
            return                       # sent when the driver posts a request buffer
        vq, chain = self.buffers.popleft()       # the oldest (spec §4.1)
        self.pending = None
        assert self.dev.mem is not None
        vq.push(chain, chain.write(self.dev.mem, r.request))
        self.dev.notify(vq.index)

    def next_deadline(self) -> float | None:
        return None if self.rounds is None else self.rounds.next_deadline()

    def handle_timer(self, now: float) -> None:
        if self.rounds is not None and self.rounds.expire(now):
            self._ended(self.rounds.current)

    def process(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        assert self.rounds is not None
        dev, glog = self.dev, self.dev.glog
        batch = ChainBatch(vq, mem)
        for chain in batch:
            if chain.nread == 0:                                # a request buffer (§4.1)
                if sum(chain.lens) < C.VIRTIO_BALLOON_BITMAP_REQ_SIZE:
                    glog.error("bitmap-request-short", "queue %d chain %d is shorter than a "
                               "request; returned", vq.index, chain.head)
                    vq.push(chain, 0)
                elif len(self.buffers) >= MAX_REQUEST_BUFFERS:
                    glog.error("bitmap-request-extra", "queue %d: %d request buffers are "
                               "held already; chain %d returned unused", vq.index,
                               len(self.buffers), chain.head)
                    vq.push(chain, 0)
                else:
                    chain.forget_hosts()
                    self.buffers.append((vq, chain))
                continue
            current = self.rounds.current
            ptrs, lens, n = chain.read_spans()
            verdict = self.rounds.receive_spans(ptrs, lens, n, sum(chain.lens[n:]),
                                                now=dev.clock())
            if not verdict.merged:
                chunk_id = self.rounds.last_chunk_id
                if chunk_id is not None and (current is None or chunk_id != current.id):
                    old = dev.rounds.find(chunk_id)       # counted in the round it names
                    if old is not None and old.kind == "bitmap":
                        old.dropped[verdict] += 1
                glog.warning(verdict.value, "queue %d chain %d dropped", vq.index, chain.head)
            vq.push(chain, 0)
            if verdict is Verdict.DONE:
                self._ended(current)
        self._send_request()
        return batch.more
