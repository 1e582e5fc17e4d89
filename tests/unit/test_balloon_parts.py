"""The balloon without a socket (tests/balloonrig.py): its parts, the device kit, and the
time rules -- no event loop, no vhost-user."""
from __future__ import annotations

import logging

import numpy as np
from balloonrig import PAGE, Rig

from vballoon.devices.balloon import (ActualChanged, Balloon, RoundEnded, RoundStarted,
                                      StatsUpdated)
from vballoon.virtio.device import CHAINS_PER_CALL, TRANSPORT_FEATURES, Device
from vballoon.wire import BALLOON_STAT, C, LE32


def pfn_buffer(rig, pfns):
    data = np.asarray(pfns, dtype="<u4").tobytes()
    gpa = rig.ram.alloc(len(data), 4)
    rig.ram.at(gpa, len(data))[:] = data
    return gpa, len(data)


def test_a_device_gets_the_transport_features_by_default():
    class Nothing(Device):
        def device_features(self):
            return 1 << 3
    assert Nothing().features() == TRANSPORT_FEATURES | 1 << 3
    assert Balloon([]).features() == TRANSPORT_FEATURES


def test_queue_handlers_come_from_a_table_by_role():
    with Rig() as rig:
        assert set(rig.dev.handlers) == {"inflate", "deflate", "stats", "hint", "reporting",
                                         "bitmap"}
        seen = []
        rig.dev.handlers["inflate"] = lambda vq, mem: seen.append(vq.index) or False
        assert rig.run("inflate") is False and seen == [0]


def test_inflate_without_a_socket_discards_and_returns_the_buffer():
    with Rig() as rig:
        q = rig.driver["inflate"]
        pfns = list(range(1000, 1100))
        for p in pfns:
            rig.ram.at(p * PAGE, 4)[:] = b"used"
        q.add([(*pfn_buffer(rig, pfns), False)])
        rig.run("inflate")
        assert [u.len for u in q.reap()] == [0]
        assert rig.dev.counters.inflated_pages == 100
        assert all(bytes(rig.ram.at(p * PAGE, 4)) == b"\0\0\0\0" for p in pfns)
        assert rig.dev.inflated.count() == 100


def test_process_is_bounded_per_call_when_the_transport_reschedules():
    with Rig(queue_size=512) as rig:
        rig.dev.transport_reschedules = True
        q = rig.driver["inflate"]
        for i in range(CHAINS_PER_CALL + 10):
            q.add([(*pfn_buffer(rig, [2000 + i]), False)])
        assert rig.run("inflate") is True                # stopped at the bound, work left
        assert len(q.reap()) == CHAINS_PER_CALL
        assert rig.run("inflate") is False
        assert len(q.reap()) == 10


def test_process_drains_the_queue_when_the_transport_does_not_reschedule():
    with Rig(queue_size=512) as rig:
        q = rig.driver["inflate"]
        for i in range(CHAINS_PER_CALL + 10):
            q.add([(*pfn_buffer(rig, [2000 + i]), False)])
        assert rig.run("inflate") is False
        assert len(q.reap()) == CHAINS_PER_CALL + 10


def test_device_events_are_typed():
    with Rig(stats_interval=5) as rig:
        cfg = bytearray(rig.dev.get_config())
        cfg[4:8] = LE32.pack(7)
        rig.dev.set_config(0, bytes(cfg), False)
        assert rig.events == [ActualChanged(7)]
        stat = BALLOON_STAT.struct.pack(C.VIRTIO_BALLOON_S_MEMFREE, 42)
        gpa = rig.ram.alloc(len(stat))
        rig.ram.at(gpa, len(stat))[:] = stat
        rig.driver["stats"].add([(gpa, len(stat), False)])
        rig.run("stats")
        assert isinstance(rig.events[-1], StatsUpdated)
        assert rig.events[-1].stats.values == {"free-memory": 42}
        r = rig.dev.start_round("hint")
        assert rig.events[-1] == RoundStarted(r)
        rig.dev.start_round("hint")
        assert RoundEnded(r) in rig.events


def test_an_idle_device_needs_no_time_and_a_held_stats_buffer_does():
    with Rig(stats_interval=5) as rig:
        assert rig.dev.next_deadline() is None
        stat = BALLOON_STAT.struct.pack(C.VIRTIO_BALLOON_S_MEMFREE, 1)
        gpa = rig.ram.alloc(len(stat))
        rig.ram.at(gpa, len(stat))[:] = stat
        rig.driver["stats"].add([(gpa, len(stat), False)])
        rig.run("stats")
        assert rig.dev.next_deadline() == rig.clock.now + 5
        rig.clock.now += 5
        rig.dev.handle_timer(rig.clock.now)
        assert len(rig.driver["stats"].reap()) == 1      # returned: fresh stats requested
        assert rig.dev.next_deadline() is None           # nothing held, nothing to wait for


def test_round_deadlines_are_the_earliest_of_the_parts():
    with Rig() as rig:
        h = rig.dev.start_round("hint")
        assert rig.dev.next_deadline() == h.requested_at + 30
        b = rig.dev.start_round("bitmap")
        assert rig.dev.next_deadline() == b.requested_at + 5


def test_guest_error_logs_are_rate_limited(caplog):
    with Rig() as rig, caplog.at_level(logging.WARNING):
        q = rig.driver["inflate"]
        bad = pfn_buffer(rig, [0xFFFFFFF0])
        for _ in range(500):
            q.add([(*bad, False)])
            rig.run("inflate")
            q.reap()
        lines = [r for r in caplog.records if "inflate-pfn-outside-ram" in r.getMessage()]
        assert 1 <= len(lines) <= 10
        assert rig.dev.glog.suppressed >= 490
