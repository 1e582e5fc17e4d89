"""Free page hinting (VIRTIO 1.2 §5.5.6.4): cmd_id rounds on the free page hint queue.

The device sets ``free_page_hint_cmd_id`` to a fresh id; the driver answers with the id, then
buffers of free pages, then STOP.  Hints are recorded in the round's map and **never
discarded** (the guest may take the pages back at any moment).  DONE is set as soon as STOP
arrives (the map is the device's own copy), or after :data:`HINT_ROUND_TIMEOUT`.
"""
from __future__ import annotations

from vballoon.devices.balloon.context import BalloonContext
from vballoon.errors import ConfigError
from vballoon.fpmap import FreePageMap
from vballoon.fpmap.rounds import Round, RoundState
from vballoon.virtio.device import ChainBatch
from vballoon.virtio.memory import GuestMemory
from vballoon.virtio.virtqueue import VirtQueue
from vballoon.units import FRAME as PAGE
from vballoon.wire import LE32, C


HINT_CMD_ID_MIN = 0x80000000    # as QEMU: far from STOP (0) and DONE (1)
HINT_ROUND_TIMEOUT = 30.0       # seconds a hint round may stay open before DONE is forced


class HintQueue:
    def __init__(self, dev: BalloonContext) -> None:
        self.dev = dev
        self.current: Round | None = None
        self._next_cmd_id = HINT_CMD_ID_MIN

    def start(self) -> Round:
        dev = self.dev
        if not dev.has(C.VIRTIO_BALLOON_F_FREE_PAGE_HINT) or dev.mem is None:
            raise ConfigError("hint-not-negotiated", "the driver did not ack FREE_PAGE_HINT")
        self.abort("superseded")
        cmd_id = self._next_cmd_id
        self._next_cmd_id = HINT_CMD_ID_MIN if cmd_id == 0xFFFFFFFF else cmd_id + 1
        self.current = Round(cmd_id, FreePageMap(dev.mem.ram_ranges), dev.clock(), kind="hint")
        dev.rounds.remember(self.current)
        dev.config.set_cmd_id(cmd_id)
        return self.current

    def abort(self, reason: str) -> bool:
        r = self.current
        if r is not None and r.end(RoundState.ABORTED, self.dev.clock(), reason):
            self.dev.round_ended(r)
            return True
        return False

    def next_deadline(self) -> float | None:
        r = self.current
        return r.requested_at + HINT_ROUND_TIMEOUT if r is not None and r.active else None

    def handle_timer(self, now: float) -> None:
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            self.abort("timeout")
            self.dev.config.set_cmd_id(C.VIRTIO_BALLOON_CMD_ID_DONE)

    def process(self, vq: VirtQueue, mem: GuestMemory) -> bool:
        dev, r, glog = self.dev, self.current, self.dev.glog
        stopped = False
        batch = ChainBatch(vq, mem)
        for chain in batch:
            if chain.readable and not chain.writable:
                data = chain.read(mem, limit=64)
                if len(data) != 4:
                    glog.error("hint-cmd-length", "queue %d: a %d-byte command buffer",
                               vq.index, len(data))
                else:
                    (cmd,) = LE32.unpack(data)
                    if cmd == C.VIRTIO_BALLOON_CMD_ID_STOP:
                        if r is not None and r.state is RoundState.RECEIVING:
                            stopped = r.end(RoundState.DONE, dev.clock())
                    elif r is not None and cmd == r.id and r.state is RoundState.REQUESTED:
                        r.state = RoundState.RECEIVING
                    else:
                        glog.warning("hint-stale-id", "queue %d: cmd id %#x is not the "
                                     "current round's; ignored", vq.index, cmd)
            elif chain.writable and not chain.readable:
                if r is not None and r.state is RoundState.RECEIVING \
                        and dev.config.cmd_id == r.id:
                    for b in chain.writable:
                        # Hints are whole 4 KiB frames; a partial frame is not free.
                        first, last = -(-b.addr // PAGE), (b.addr + b.len) // PAGE
                        if last > first:
                            try:
                                r.map.mark_free_range(first, last - first)
                            except ConfigError as e:
                                glog.error("hint-outside-ram", "queue %d: %s; ignored",
                                           vq.index, e)
                                continue
                            r.hints += 1
                            dev.counters.hinted_bytes += (last - first) * PAGE
            else:
                glog.error("hint-mixed-buffers", "queue %d chain %d mixes directions; "
                           "ignored", vq.index, chain.head)
            vq.push(chain, 0)
        if stopped:
            assert r is not None
            dev.round_ended(r)
            # Nothing here keeps the pages past the round (the map is ours): release them now.
            dev.config.set_cmd_id(C.VIRTIO_BALLOON_CMD_ID_DONE)
        return batch.more
