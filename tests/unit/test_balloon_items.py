"""Regression tests for issue 10's items in the device layer, on the socket-less rig."""
from __future__ import annotations

import numpy as np
import pytest
from balloonrig import Rig

from vballoon.app.service import BalloonService
from vballoon.devices.balloon import RoundEnded
from vballoon.devices.balloon.bitmap import MAX_REQUEST_BUFFERS
from vballoon.errors import ConfigError
from vballoon.fpmap import RoundState, Verdict
from vballoon.fpmap.map import CHUNK_HEADER, CMD_GET_FREE, F_DONE, PAGE_SHIFT, REQUEST
from vballoon.wire import BALLOON_STAT, C


def stats_buffer(rig, size=None):
    data = BALLOON_STAT.struct.pack(C.VIRTIO_BALLOON_S_MEMFREE, 5)
    if size is not None:
        data = data * (size // len(data)) + bytes(size % len(data))
    gpa = rig.ram.alloc(len(data))
    rig.ram.at(gpa, len(data))[:] = data
    return gpa, len(data)


def test_item2_an_oversized_stats_buffer_leaves_the_held_one_alone():
    with Rig(stats_interval=5) as rig:
        q = rig.driver["stats"]
        q.add([(*stats_buffer(rig), False)])
        rig.run("stats")
        assert q.reap() == []                              # held
        q.add([(*stats_buffer(rig, 5000), False)])
        rig.run("stats")                                   # no push-unknown-head, no raise
        assert [u.len for u in q.reap()] == [0]           # the big one, returned
        rig.clock.now += 5
        rig.dev.handle_timer(rig.clock.now)               # the held one, once
        assert len(q.reap()) == 1
        rig.clock.now += 5
        rig.dev.handle_timer(rig.clock.now)               # nothing held: nothing returned
        assert q.reap() == []
        q.add([(*stats_buffer(rig), False)])              # a well-behaved driver goes on
        rig.run("stats")
        assert rig.dev.stats.count == 2 and rig.dev.next_deadline() == rig.clock.now + 5


def service(rig):
    svc = BalloonService(rig.dev)
    events = []
    svc.subscribe(lambda name, data: events.append((name, data)))
    rig.dev.on_change = svc.handle_event
    return svc, events


def test_item3_evicted_round_query():
    with Rig() as rig:
        svc, events = service(rig)
        b = rig.dev.start_round("bitmap")
        hints = [rig.dev.start_round("hint") for _ in range(4)]
        assert b.id not in rig.dev.rounds
        with pytest.raises(ConfigError, match=f"no round {b.id} "):
            svc.query_round(b.id)
        rig.clock.now += 10
        rig.dev.handle_timer(rig.clock.now)               # the evicted round times out
        assert b.state is RoundState.ABORTED
        assert [d["id"] for n, d in events if n == "FREE_PAGE_ROUND_COMPLETED"][-1] == b.id
        rig.clock.now += 30
        rig.dev.handle_timer(rig.clock.now)               # no hint round stays requested
        assert not any(h.active for h in hints)
        b2 = rig.dev.start_round("bitmap")                 # later rounds work
        assert b2.id == b.id + 1 and svc.query_round(b2.id).state == "requested"
        rig.dev.reset()                                     # ... across reconnects
        rig.dev.set_features(rig.dev.features())
        rig.dev.memory_changed(rig.mem)
        b3 = rig.dev.start_round("bitmap")
        assert b3.id == b2.id + 1 and svc.query_round().id == b3.id


def test_item3_a_waiter_of_an_evicted_round_gets_its_description():
    import asyncio

    async def main():
        with Rig() as rig:
            svc, _ = service(rig)
            b = rig.dev.start_round("bitmap")
            waiting = asyncio.ensure_future(svc.wait_round(b.id, 5))
            await asyncio.sleep(0)
            for _ in range(4):
                rig.dev.start_round("hint")
            rig.clock.now += 10
            rig.dev.handle_timer(rig.clock.now)
            info = await waiting
            assert info.id == b.id and info.state == "aborted"
    asyncio.run(main())


def test_item14_one_completed_event_per_round_across_disconnects():
    with Rig() as rig:
        svc, events = service(rig)
        b = rig.dev.start_round("bitmap")
        h = rig.dev.start_round("hint")
        rig.clock.now += 10
        rig.dev.handle_timer(rig.clock.now)
        for _ in range(3):                                 # three disconnects
            rig.dev.reset()
            rig.dev.set_features(rig.dev.features())
            rig.dev.memory_changed(rig.mem)
        ended = [d["id"] for n, d in events if n == "FREE_PAGE_ROUND_COMPLETED"]
        assert sorted(ended) == sorted([b.id, h.id])
        assert [e for e in rig.events if isinstance(e, RoundEnded)] == []   # went to svc


# -- the bitmap queue's request buffers (protocol/bitmap-queue.md §4.1) -----------------------

def post_request(rig):
    gpa = rig.ram.alloc(C.VIRTIO_BALLOON_BITMAP_REQ_SIZE)
    rig.driver["bitmap"].add([(gpa, C.VIRTIO_BALLOON_BITMAP_REQ_SIZE, True)])
    return gpa


def chunk(rig, rid, start_pfn=0, bits=b"", nr_pfns=None, flags=F_DONE):
    nr = 8 * len(bits) if nr_pfns is None else nr_pfns
    hdr = CHUNK_HEADER.pack(CMD_GET_FREE, PAGE_SHIFT, flags, 0, rid, start_pfn, nr)
    data = hdr + bits
    gpa = rig.ram.alloc(len(data), 8)
    rig.ram.at(gpa, len(data))[:] = data
    rig.driver["bitmap"].add([(gpa, len(data), False)])


def request_in(rig, gpa):
    return REQUEST.unpack(bytes(rig.ram.at(gpa, REQUEST.size)))


def test_item17_posted_request_buffers_are_held_and_the_oldest_used():
    with Rig() as rig:
        q = rig.driver["bitmap"]
        first, second = post_request(rig), post_request(rig)
        rig.run("bitmap")
        assert q.reap() == []                               # both held, none ping-ponged
        r = rig.dev.start_round("bitmap")
        used = q.reap()
        assert len(used) == 1 and used[0].len == REQUEST.size
        assert request_in(rig, first).id == r.id           # the oldest
        assert request_in(rig, second).id == 0
        r2 = rig.dev.start_round("bitmap")
        assert request_in(rig, second).id == r2.id


def test_item17_request_buffers_beyond_the_bound_are_returned_unused():
    with Rig(queue_size=64) as rig:
        q = rig.driver["bitmap"]
        for _ in range(MAX_REQUEST_BUFFERS + 2):
            post_request(rig)
        rig.run("bitmap")
        assert [u.len for u in q.reap()] == [0, 0]


def test_item17_an_ended_round_writes_no_request_into_a_buffer_posted_later():
    with Rig() as rig:
        q = rig.driver["bitmap"]
        r = rig.dev.start_round("bitmap")                   # no buffer posted yet
        rig.clock.now += 10
        rig.dev.handle_timer(rig.clock.now)
        assert r.state is RoundState.ABORTED
        gpa = post_request(rig)
        rig.run("bitmap")
        assert q.reap() == [] and request_in(rig, gpa).id == 0   # held, untouched


def test_item17_an_identical_memory_table_is_no_memory_change():
    with Rig() as rig:
        r = rig.dev.start_round("bitmap")
        rig.dev.memory_changed(rig.mem)
        assert r.state is RoundState.REQUESTED


def test_item17_a_reboot_aborts_with_reset():
    with Rig() as rig:
        r = rig.dev.start_round("bitmap")
        rig.dev.driver_restarted()
        rig.dev.memory_changed(rig.mem)                     # the table, sent again
        assert r.state is RoundState.ABORTED and r.abort_reason == "reset"


def test_item17_an_empty_cont_chunk_moves_the_round_to_receiving():
    with Rig() as rig:
        post_request(rig)
        r = rig.dev.start_round("bitmap")
        chunk(rig, r.id, 0, b"", nr_pfns=0, flags=0)
        rig.clock.now += 3
        rig.run("bitmap")
        assert r.state is RoundState.RECEIVING and r.chunks == 1
        assert r.last_activity == rig.clock.now            # a keep-alive


def test_item17_drop_verdicts_are_counted_in_the_round_they_name():
    with Rig() as rig:
        svc, _ = service(rig)
        post_request(rig)
        r1 = rig.dev.start_round("bitmap")
        r2 = rig.dev.start_round("bitmap")
        chunk(rig, r1.id, 0, bytes(8))                      # stale: r1's id
        chunk(rig, r2.id, 3, bytes(8))                      # unaligned, r2's id
        rig.run("bitmap")
        assert r1.dropped[Verdict.STALE_ID] == 1 and r2.dropped[Verdict.UNALIGNED] == 1
        assert svc.query_round(r1.id).to_qmp()["dropped"] == {"chunk-stale-id": 1}
        assert svc.query_round(r2.id).to_qmp()["dropped"] == {"chunk-start-unaligned": 1}


def test_item13_query_with_max_ranges_1_materialises_one_range():
    import tracemalloc
    with Rig() as rig:
        svc, _ = service(rig)
        r = rig.dev.start_round("bitmap")
        alt = np.full(r.map.nwords, 0x5555555555555555, dtype=np.uint64)
        r.map.or_bitmap(0, alt.view(np.uint8), r.map.max_pfn)
        tracemalloc.start()
        info = svc.query_round(r.id, ranges=True, max_ranges=1)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert info.range_count == r.map.max_pfn // 2 and len(info.ranges) == 1
        assert info.next_pfn == 1
        assert peak < 64 << 10                             # not 16 bytes per range


def test_item17_start_pfn_bound_is_inclusive():
    with Rig() as rig:
        svc, _ = service(rig)
        r = rig.dev.start_round("hint")
        r.map.mark_free_range(100, 5)
        end = r.map.max_pfn
        info = svc.query_round(r.id, ranges=True, start_pfn=end)
        assert info.ranges.tolist() == [] and info.range_count == 0 and info.next_pfn is None
        with pytest.raises(ConfigError, match=f"expects a pfn from 0 to {end}"):
            svc.query_round(r.id, ranges=True, start_pfn=end + 1)
        info = svc.query_round(r.id, ranges=True, start_pfn=102, max_ranges=0)
        assert info.range_count == 1 and info.next_pfn == 102
        assert info.to_qmp()["ranges"] == []
