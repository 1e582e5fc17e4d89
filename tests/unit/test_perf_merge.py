"""Discard across buffers (issue 14): the inflate and reporting handlers merge the runs of every
chain of one call, discard once per run and region, and only then return the buffers."""
from __future__ import annotations

import numpy as np
import pytest
from balloonrig import MiB, PAGE, Rig

from vballoon.devices.balloon.inflate import PageSet, pfn_runs, sorted_runs, unique_sorted
from vballoon.devices.balloon.reporting import merge_run_arrays, merge_runs
from vballoon.errors import GuestError


def pfn_buffer(rig, pfns):
    data = np.asarray(pfns, dtype="<u4").tobytes()
    gpa = rig.ram.alloc(len(data), 4)
    rig.ram.at(gpa, len(data))[:] = data
    return gpa, len(data)


def touch(rig, pfns):
    for p in pfns:
        rig.ram.at(p * PAGE, 4)[:] = b"used"


def zeroed(rig, pfns):
    return all(bytes(rig.ram.at(p * PAGE, 4)) == b"\0\0\0\0" for p in pfns)


def test_a_run_spanning_two_buffers_is_one_discard():
    with Rig(queue_size=64) as rig:
        q = rig.driver["inflate"]
        pfns = list(range(4096, 4096 + 512))
        touch(rig, pfns)
        q.add([(*pfn_buffer(rig, pfns[:256]), False)])
        q.add([(*pfn_buffer(rig, pfns[256:]), False)])
        rig.run("inflate")
        assert len(q.reap()) == 2
        assert rig.dev.counters.discard_calls == 1
        assert rig.dev.counters.discarded_bytes == 512 * PAGE
        assert rig.dev.counters.inflated_pages == 512 and zeroed(rig, pfns)


def test_a_run_crossing_a_region_boundary_is_split_per_region():
    with Rig(layout=((0, 32 * MiB), (32 * MiB, 32 * MiB))) as rig:
        q = rig.driver["inflate"]
        edge = 32 * MiB // PAGE
        pfns = list(range(edge - 16, edge + 16))
        touch(rig, pfns)
        q.add([(*pfn_buffer(rig, pfns[:20]), False)])
        q.add([(*pfn_buffer(rig, pfns[20:]), False)])
        rig.run("inflate")
        assert rig.dev.counters.discard_calls == 2          # one per region, one run
        assert rig.dev.counters.discarded_bytes == 32 * PAGE and zeroed(rig, pfns)


def test_overlapping_and_duplicate_pfns_are_discarded_and_counted_once():
    with Rig() as rig:
        q = rig.driver["inflate"]
        a, b = list(range(5000, 5100)), list(range(5050, 5150)) + [5000, 5000, 5149]
        touch(rig, a + b)
        q.add([(*pfn_buffer(rig, a), False)])
        q.add([(*pfn_buffer(rig, b), False)])
        rig.run("inflate")
        assert rig.dev.counters.inflated_pages == 150
        assert rig.dev.counters.discarded_bytes == 150 * PAGE
        assert rig.dev.counters.discard_calls == 1
        assert rig.dev.inflated.count() == 150
        # inflating pages already in the balloon again discards nothing more
        q.add([(*pfn_buffer(rig, a), False)])
        rig.run("inflate")
        assert rig.dev.counters.inflated_pages == 150
        assert rig.dev.counters.discarded_bytes == 150 * PAGE


def test_invalid_chains_in_a_batch_do_not_stop_the_others(caplog):
    with Rig() as rig:
        q = rig.driver["inflate"]
        good = list(range(6000, 6010))
        touch(rig, good)
        q.add([(*pfn_buffer(rig, good[:5]), False)])
        gpa, _ = pfn_buffer(rig, [1, 2])
        q.add([(gpa, 7, False)])                              # not a multiple of 4
        q.add([(*pfn_buffer(rig, [1 << 30]), False)])          # outside RAM
        q.add([(*pfn_buffer(rig, good[5:]), False)])
        rig.run("inflate")
        assert len(q.reap()) == 4
        assert "inflate-length" in caplog.text and "inflate-pfn-outside-ram" in caplog.text
        assert rig.dev.counters.inflated_pages == 10 and zeroed(rig, good)
        assert rig.dev.counters.discard_calls == 1


def test_discard_happens_before_any_buffer_is_returned():
    """MUST_TELL_HOST (§5.5.6.2.1): the driver may reuse nothing before the buffer is used, and
    the device must be done with the pages by then."""
    with Rig(features=["must-tell-host", "stats"]) as rig:
        q = rig.driver["inflate"]
        seen = []
        inner = rig.dev.discard

        def discard(mem, runs):
            seen.append((q.used_idx(), int(runs[1].sum())))
            return inner(mem, runs)
        rig.dev.discard = discard
        for i in range(3):
            q.add([(*pfn_buffer(rig, range(7000 + 100 * i, 7100 + 100 * i)), False)])
        rig.run("inflate")
        assert seen == [(0, 300)]                  # one discard, no buffer used before it
        assert q.used_idx() == 3


def test_a_broken_chain_still_discards_and_returns_those_before_it():
    with Rig() as rig:
        q = rig.driver["inflate"]
        pfns = list(range(8000, 8100))
        touch(rig, pfns)
        q.add([(*pfn_buffer(rig, pfns), False)])
        q.publish(999)                             # a head past the queue size
        with pytest.raises(GuestError):
            rig.run("inflate")
        assert [u.len for u in q.reap()] == [0]
        assert zeroed(rig, pfns) and rig.dev.counters.inflated_pages == 100


def test_reporting_merges_ranges_across_chains():
    with Rig() as rig:
        q = rig.driver["reporting"]
        base = 32 * MiB
        touch(rig, range(base // PAGE, (base + 8 * MiB) // PAGE))
        q.add([(base + 4 * MiB, 4 * MiB, True)])
        q.add([(base, 2 * MiB, True), (base + 2 * MiB, 2 * MiB, True)])
        q.add([(base + MiB, MiB, True)])                         # overlaps
        rig.run("reporting")
        assert len(q.reap()) == 3
        assert rig.dev.counters.discard_calls == 1
        assert rig.dev.counters.discarded_bytes == 8 * MiB
        assert rig.dev.counters.reported_bytes == 9 * MiB
        assert zeroed(rig, range(base // PAGE, (base + 8 * MiB) // PAGE))


def test_reporting_discards_nothing_before_returning_when_poisoned():
    with Rig() as rig:
        rig.dev.config.poison_val = 0xAA
        q = rig.driver["reporting"]
        touch(rig, [32 * MiB // PAGE])
        q.add([(32 * MiB, 4 * MiB, True)])
        rig.run("reporting")
        assert len(q.reap()) == 1 and rig.dev.counters.discard_calls == 0
        assert bytes(rig.ram.at(32 * MiB, 4)) == b"used"


def test_merge_helpers():
    s, n = merge_run_arrays(np.array([10, 0, 4, 11, 30, 30]), np.array([2, 4, 2, 5, 1, 3]))
    assert s.tolist() == [0, 10, 30] and n.tolist() == [6, 6, 3]
    assert [a.size for a in merge_run_arrays(np.zeros(0), np.zeros(0))] == [0, 0]
    s, n = merge_runs([(3, 0), (1, 1)])
    assert s.tolist() == [1] and n.tolist() == [1]
    assert unique_sorted(np.array([5, 1, 5, 3, 1])).tolist() == [1, 3, 5]
    s, n = sorted_runs(np.array([1, 2, 3, 7, 8]))
    assert s.tolist() == [1, 7] and n.tolist() == [3, 2]
    s, n = pfn_runs(np.array([8, 7, 3, 1, 2], dtype=np.uint32))
    assert s.tolist() == [1, 7] and n.tolist() == [3, 2]


def test_pageset_update_matches_a_python_set():
    rng = np.random.default_rng(3)
    ps = PageSet()
    ps.set_extents([(0, 1000), (2000, 2600)])
    ref: set[int] = set()
    valid = np.concatenate((np.arange(0, 1000), np.arange(2000, 2600)))
    for _ in range(50):
        pfns = rng.choice(valid, rng.integers(0, 300))
        value = bool(rng.integers(0, 2))
        changed = ps.update(pfns, value)
        want = sorted(set(pfns.tolist()) - ref if value else set(pfns.tolist()) & ref)
        assert changed.tolist() == want
        ref = ref | set(want) if value else ref - set(want)
        assert ps.pfns().tolist() == sorted(ref) and ps.count() == len(ref)
