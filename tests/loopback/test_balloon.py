"""The balloon device end to end: the loopback guest driver, the daemon, real memfd reclaim."""
from __future__ import annotations


import pytest
from vbtest import until

from vballoon.devices.balloon import ActualChanged, RoundEnded
from vballoon.devices.balloon.device import Balloon, merge_runs, pfn_runs
from vballoon.fpmap import RoundState
from vballoon.errors import ConfigError
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.vhost.transport import Server
from vballoon.wire import BALLOON_CONFIG, BALLOON_STAT, C, LE32

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
async def rig(sock_path):
    """daemon + front-end + guest driver, on 64 MiB of RAM with a 32 MiB hole in the middle."""
    rigs = []

    async def make(features=None, offered=None, layout=((0, 32 * MiB), (64 * MiB, 32 * MiB)),
                   poison_val=0):
        device = Balloon(offered)
        srv = Server(sock_path, device)
        srv.start()
        ram = GuestRam(list(layout))
        fe = await Frontend.connect(sock_path)
        await fe.init(device.max_queues())
        guest = BalloonGuest(fe, ram, features=features)
        await guest.probe(poison_val=poison_val)
        rigs.append((srv, fe, guest, ram))
        return device, guest, ram

    yield make
    for srv, fe, guest, ram in rigs:
        await fe.close()
        guest.close()
        await srv.close()
        ram.close()


def touch(ram, pfns):
    for p in pfns:
        ram.at(p * PAGE, PAGE)[:8] = b"usedpage"


async def test_inflate_discards_the_pages_from_the_memfd(rig):
    device, guest, ram = await rig()
    pool = guest.pool[:4096]
    touch(ram, pool)
    before = ram.allocated_bytes
    pfns = await guest.inflate(4096)                  # 16 MiB in 16 buffers of 256 pfns
    assert sorted(pfns) == sorted(pool)
    assert before - ram.allocated_bytes >= 16 * MiB
    assert device.counters.inflated_pages == 4096
    assert device.counters.discarded_bytes == 16 * MiB
    assert device.counters.discard_calls <= 16       # one per contiguous range, not per page
    assert all(bytes(ram.at(p * PAGE, 8)) == bytes(8) for p in pfns)   # read back as zero


async def test_deflate_returns_pages_to_the_guest(rig):
    device, guest, ram = await rig()
    pfns = await guest.inflate(512)
    await guest.deflate(512)
    assert device.counters.inflated_pages == 0
    touch(ram, pfns)                                  # the guest uses them again
    assert all(bytes(ram.at(p * PAGE, 8)) == b"usedpage" for p in pfns)


async def test_target_set_through_the_api_is_reached_and_reported_back(rig):
    device, guest, _ = await rig()
    changes = []
    device.on_change = changes.append
    device.set_target(1000)
    await guest.fe.wait_config_change()
    assert await guest.balance() == 1000
    assert device.actual == 1000 and ActualChanged(1000) in changes
    device.set_target(200)
    await guest.fe.wait_config_change()
    assert await guest.balance() == -800
    assert device.actual == 200 and device.counters.inflated_pages == 200


async def test_target_beyond_guest_ram_is_refused(rig):
    device, _, _ = await rig()
    with pytest.raises(ConfigError, match="target-range"):
        device.set_target(device.ram_pages + 1)


async def test_stats_arrive_and_are_refreshed_on_request(rig):
    device, guest, _ = await rig()
    await until(lambda: device.stats.count == 1)
    assert device.stats.values["free-memory"] == guest.stats_values[C.VIRTIO_BALLOON_S_MEMFREE]
    guest.stats_values[C.VIRTIO_BALLOON_S_MEMFREE] = 12345
    guest.stats_values[200] = 7                       # a tag the device does not know
    assert device.request_stats()
    await guest.answer_stats_request()
    await until(lambda: device.stats.count == 2)
    assert device.stats.values["free-memory"] == 12345
    assert 200 not in device.stats.values and len(device.stats.values) == 2
    assert device.stats.updated is not None


async def test_free_page_hint_round_records_hints_and_discards_nothing(rig):
    device, guest, ram = await rig()
    blocks = [(16 * MiB, 4 * MiB), (70 * MiB, 4 * MiB)]
    touch(ram, [b // PAGE for b, n in blocks for b in range(b, b + n, PAGE)])
    before = ram.allocated_bytes
    ended = []
    device.on_change = ended.append
    r = device.start_round("hint")
    await guest.fe.wait_config_change()
    num_pages, actual, cmd_id, _ = await guest.config()
    assert cmd_id == r.id >= 0x80000000
    await guest.hint(cmd_id, blocks)
    assert r.state is RoundState.DONE and RoundEnded(r) in ended
    assert r.map.ranges().tolist() == [[16 * MiB // PAGE, 1024], [70 * MiB // PAGE, 1024]]
    assert r.map.covered_pages() == 2048 and r.hints == 2
    assert (await guest.config())[2] == C.VIRTIO_BALLOON_CMD_ID_DONE
    assert ram.allocated_bytes == before              # hinted pages are never discarded
    r2 = device.start_hint_round()
    assert r2.id == r.id + 1


async def test_hint_with_an_id_never_issued_is_ignored(rig, caplog):
    device, guest, _ = await rig()
    r = device.start_hint_round()
    await guest.hint(0x1234, [(16 * MiB, 4 * MiB)])
    assert "hint-stale-id" in caplog.text
    assert r.map.free_pages() == 0 and r.state is RoundState.REQUESTED


async def test_free_page_reporting_discards_reported_pages(rig):
    device, guest, ram = await rig()
    ranges = [(64 * MiB + i * 4 * MiB, 4 * MiB) for i in range(4)]
    touch(ram, [p // PAGE for a, n in ranges for p in range(a, a + n, PAGE)])
    before = ram.allocated_bytes
    await guest.report(ranges)
    assert before - ram.allocated_bytes >= 16 * MiB
    assert device.counters.reported_bytes == 16 * MiB
    assert device.counters.discarded_bytes == 16 * MiB
    assert device.counters.discard_calls == 1          # adjacent ranges coalesced


async def test_reported_pages_are_kept_when_poison_val_is_not_zero(rig):
    device, guest, ram = await rig(poison_val=0xAA)
    assert device.poison_val == 0xAA
    ranges = [(64 * MiB, 4 * MiB)]
    touch(ram, range(64 * MiB // PAGE, 68 * MiB // PAGE))
    before = ram.allocated_bytes
    await guest.report(ranges)
    assert ram.allocated_bytes == before
    assert device.counters.reported_bytes == 4 * MiB and device.counters.discarded_bytes == 0


@pytest.mark.parametrize("features,roles", [
    ([], ["inflate", "deflate"]),
    (["free-page-reporting"], ["inflate", "deflate", "reporting"]),
    (["stats", "free-page-reporting"], ["inflate", "deflate", "stats", "reporting"]),
    (["free-page-hint"], ["inflate", "deflate", "hint"]),
])
async def test_a_guest_acking_a_subset_gets_compacted_queues(rig, features, roles):
    device, guest, ram = await rig(features=features)
    assert list(device.roles.values()) == roles == list(guest.queues)
    await guest.inflate(10)
    assert device.counters.inflated_pages == 10
    if "reporting" in roles:
        await guest.report([(64 * MiB, 2 * MiB)])
        assert device.counters.reported_bytes == 2 * MiB


async def test_features_switched_off_are_not_offered(rig):
    device, guest, _ = await rig(offered=["stats"])
    assert guest.acked & 0x3F == 1 << C.VIRTIO_BALLOON_F_STATS_VQ
    assert device.max_queues() == 3


# -- bad input from the guest -------------------------------------------------------------

async def _raw(guest, role, buffers):
    q = guest.queues[role]
    q.add(buffers)
    q.kick()
    return await q.wait_used(1)


async def test_pfns_outside_ram_or_in_holes_are_ignored(rig, caplog):
    device, guest, ram = await rig()
    bad = [40 * MiB // PAGE, 1 << 30, 100 * MiB // PAGE]      # in the hole, far, past the end
    good = guest.pool[:2]
    buf = ram.alloc(20, 4)
    ram.at(buf, 20)[:] = b"".join(LE32.pack(p) for p in bad + good)
    await _raw(guest, "inflate", [(buf, 20, False)])
    assert "inflate-pfn-outside-ram" in caplog.text
    assert device.counters.inflated_pages == 2


async def test_inflate_buffer_not_a_multiple_of_4_is_ignored(rig, caplog):
    device, guest, ram = await rig()
    buf = ram.alloc(8, 4)
    await _raw(guest, "inflate", [(buf, 6, False)])
    assert "inflate-length" in caplog.text and device.counters.inflated_pages == 0


async def test_inflate_buffer_in_the_wrong_direction_is_ignored(rig, caplog):
    device, guest, ram = await rig()
    buf = ram.alloc(8, 4)
    await _raw(guest, "inflate", [(buf, 8, True)])
    assert "inflate-wrong-direction" in caplog.text and device.counters.discard_calls == 0


async def test_deflate_of_pages_not_in_the_balloon_is_logged(rig, caplog):
    device, guest, ram = await rig()
    buf = ram.alloc(4, 4)
    ram.at(buf, 4)[:] = LE32.pack(guest.pool[0])
    await _raw(guest, "deflate", [(buf, 4, False)])
    assert "deflate-not-inflated" in caplog.text and device.counters.inflated_pages == 0


async def test_reporting_buffer_in_the_wrong_direction_discards_nothing(rig, caplog):
    device, guest, ram = await rig()
    await _raw(guest, "reporting", [(64 * MiB, 4 * MiB, False)])
    assert "reporting-wrong-direction" in caplog.text and device.counters.discard_calls == 0


async def test_stats_with_a_truncated_entry(rig, caplog):
    device, guest, ram = await rig()
    await until(lambda: device.stats.count == 1)
    device.request_stats()
    await guest.queues["stats"].wait_used(1)
    data = BALLOON_STAT.pack(C.VIRTIO_BALLOON_S_MEMFREE, 99) + b"\x05\x00\x01"
    buf = ram.alloc(len(data), 8)
    ram.at(buf, len(data))[:] = data
    guest.queues["stats"].add([(buf, len(data), False)])
    guest.queues["stats"].kick()
    await until(lambda: device.stats.count == 2)
    assert "stats-truncated" in caplog.text
    assert device.stats.values == {"free-memory": 99}


async def test_set_config_cannot_write_num_pages_or_cmd_id(rig, caplog):
    device, guest, _ = await rig()
    await guest.fe.set_config(BALLOON_CONFIG.pack(777, 5, 0x4242, 0))
    assert "config-readonly-field" in caplog.text
    assert device.num_pages == 0 and device.cmd_id == 0
    assert device.actual == 5                       # the writable field is taken


async def test_set_config_with_a_stale_num_pages_is_not_an_error(rig, caplog):
    device, guest, _ = await rig()
    device.set_target(100)
    device.set_target(50)
    caplog.clear()
    await guest.fe.set_config(BALLOON_CONFIG.pack(100, 3, 0, 0))   # QEMU's cached copy
    assert "config-readonly-field" not in caplog.text and device.num_pages == 50


def test_unknown_feature_name_is_refused():
    with pytest.raises(ConfigError, match="unknown-feature"):
        Balloon(["warp"])


def test_pfn_runs_and_merge_runs():
    import numpy as np
    starts, counts = pfn_runs(np.array([5, 1, 2, 3, 7, 8], dtype=np.uint32))
    assert list(zip(starts.tolist(), counts.tolist())) == [(1, 3), (5, 1), (7, 2)]
    starts, counts = merge_runs([(10, 2), (0, 4), (4, 2), (11, 5)])
    assert list(zip(starts.tolist(), counts.tolist())) == [(0, 6), (10, 6)]
    assert [a.size for a in pfn_runs(np.zeros(0, dtype=np.uint32))] == [0, 0]
    assert [a.size for a in merge_runs([])] == [0, 0]


async def test_a_hint_round_the_guest_never_stops_times_out_with_done(rig):
    device, guest, _ = await rig()
    r = device.start_round("hint")
    await guest.fe.wait_config_change()
    device.handle_timer(r.requested_at + 29)
    assert r.active
    device.handle_timer(r.requested_at + 31)
    assert r.state is RoundState.ABORTED and r.abort_reason == "timeout"
    await guest.fe.wait_config_change()             # DONE announced: the guest frees its hints
    assert (await guest.config())[2] == C.VIRTIO_BALLOON_CMD_ID_DONE


def test_the_guest_page_pool_hands_out_deflated_pages_first_then_ram_top_down():
    from vballoon.sim.guest import PagePool
    p = PagePool([range(99, 89, -1)], pages=[1, 2, 3])
    assert p[:5] == [1, 2, 3, 99, 98] and p[0] == 1 and len(p) == 13
    assert p.take(4) == [1, 2, 3, 99] and p[:2] == [98, 97]
    p.give([7, 8])
    assert p.take(20) == [7, 8, 98, 97, 96, 95, 94, 93, 92, 91, 90] and len(p) == 0
