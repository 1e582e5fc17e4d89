"""The free-page-bitmap queue end to end: the reference guest answers rounds over vhost-user."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vballoon.devices.balloon import Balloon, RoundEnded
from vballoon.errors import ConfigError
from vballoon.fpmap import FreePageMap, RoundState
from vballoon.sim import Frontend, GuestRam
from vballoon.sim.guest import BalloonGuest
from vballoon.sim.scanner import BuddyModel, Chunk
from vballoon.vhost.transport import Server
from vballoon.wire import C

MiB = 1 << 20


@pytest.fixture
async def rig(sock_path):
    """A 3 GiB q35-like guest (RAM below 2 GiB and from 4 GiB; sparse memfd), its buddy model,
    the daemon and the reference driver."""
    model = BuddyModel.after_workload(3 << 30, seed=7)
    device = Balloon()
    srv = Server(sock_path, device)
    srv.start()
    ram = GuestRam(model.layout)
    fe = await Frontend.connect(sock_path)
    await fe.init(device.max_queues())
    guest = BalloonGuest(fe, ram, driver_at=16 * MiB, driver_bytes=4 * MiB, queue_size=64)
    await guest.probe()
    yield device, guest, model
    await fe.close()
    guest.close()
    await srv.close()
    ram.close()


def expected_map(model):
    m = FreePageMap(model.layout)
    m.or_bitmap(0, model.free_bitmap().view(np.uint8), model.max_pfn)
    return m


async def test_a_round_reassembles_the_guests_free_pages(rig):
    device, guest, model = rig
    assert "bitmap" in device.roles.values()
    ended = []
    device.on_change = ended.append
    r = device.start_round()                 # auto: the bitmap queue, since the guest acked it
    assert r.state is RoundState.REQUESTED
    chunks = await guest.answer_bitmap_request(model)
    assert chunks == 1 and r.state is RoundState.DONE and RoundEnded(r) in ended
    assert r.map.coverage() == 1.0
    assert r.map.free_pages() == model.free_pages()
    assert np.array_equal(r.map.ranges(), expected_map(model).ranges())
    assert device.rounds[r.id] is r


async def test_rounds_get_fresh_ids_and_a_new_request_aborts_the_running_one(rig):
    device, guest, model = rig
    r1 = device.start_round("bitmap")
    r2 = device.start_round("bitmap")                  # before the guest answered r1
    assert r2.id == r1.id + 1
    assert r1.state is RoundState.ABORTED and r1.abort_reason == "superseded"
    await guest.answer_bitmap_request(model)           # the buffer carries r1's id: stale
    assert r2.state is RoundState.REQUESTED
    await guest.answer_bitmap_request(model)           # r2 was sent once the buffer came back
    assert r2.state is RoundState.DONE


async def _send(guest, chunk, writable_bitmaps=False):
    q = guest.queues["bitmap"]
    bufs, at = [], guest._chunk_buf or guest.ram.alloc(1 << 20, 64)
    guest._chunk_buf = at
    for i, data in enumerate(chunk.buffers()):
        guest.ram.at(at, len(data))[:] = data
        bufs.append((at, len(data), writable_bitmaps and i > 0))
        at += len(data)
    q.add(bufs)
    q.kick()
    await q.wait_used(1)


def one_chunk(rid, start=0, npfns=64, flags=C.VIRTIO_BALLOON_BITMAP_F_DONE):
    return Chunk(rid, start, npfns, flags, [b"\xff" * (-(-npfns // 64) * 8)],
                 C.VIRTIO_BALLOON_BITMAP_PAGE_SHIFT, C.VIRTIO_BALLOON_BITMAP_CMD_GET_FREE)


async def test_done_without_a_request_is_dropped(rig, caplog):
    device, guest, _ = rig
    await _send(guest, one_chunk(1))
    assert "chunk-no-round" in caplog.text
    assert not device.rounds


async def test_chunks_after_done_are_dropped_and_change_nothing(rig, caplog):
    device, guest, model = rig
    r = device.start_round()
    await guest.answer_bitmap_request(model)
    before = r.map.free.copy()
    for _ in range(5):
        await _send(guest, one_chunk(r.id, start=0, npfns=4096))
    assert caplog.text.count("chunk-round-closed") == 5
    assert np.array_equal(r.map.free, before) and r.state is RoundState.DONE


async def test_chunk_with_device_writable_buffers_is_dropped(rig, caplog):
    device, guest, model = rig
    r = device.start_round()
    await guest.queues["bitmap"].wait_used(1)          # the request reached the guest
    await _send(guest, one_chunk(r.id), writable_bitmaps=True)
    assert "chunk-writable" in caplog.text and r.map.free_pages() == 0


@pytest.mark.parametrize("start,npfns,rule", [
    (0, 2**64 - 64, "chunk-too-long"),
    (2**64 - 64, 64, "chunk-pfn-range"),
    (10, 64, "chunk-start-unaligned"),
    (1 << 40, 64, "chunk-pfn-range"),
])
async def test_chunks_outside_the_pfn_space_are_dropped(rig, caplog, start, npfns, rule):
    device, guest, _ = rig
    r = device.start_round()
    await guest.queues["bitmap"].wait_used(1)
    chunk = dataclasses.replace(one_chunk(r.id, start=start, npfns=64), nr_pfns=npfns)
    await _send(guest, chunk)
    assert rule in caplog.text and r.map.free_pages() == 0 and r.active


async def test_an_idle_round_times_out_and_keeps_its_coverage(rig):
    device, guest, model = rig
    r = device.start_round()
    await guest.queues["bitmap"].wait_used(1)
    await _send(guest, one_chunk(r.id, npfns=4096, flags=0))      # CONT: the round goes on
    device.handle_timer(r.last_activity + 60)
    assert r.state is RoundState.ABORTED and r.abort_reason == "timeout"
    assert r.map.covered_pages() == 4096


async def test_a_round_the_guest_cannot_take_is_refused(sock_path):
    device = Balloon(["stats"])
    with pytest.raises(ConfigError, match="bitmap-not-negotiated"):
        device.start_round("bitmap")
    with pytest.raises(ConfigError, match="round-kind"):
        device.start_round("telepathy")


async def test_only_the_last_rounds_are_kept(rig):
    device, guest, model = rig
    ids = [device.start_round("bitmap").id for _ in range(6)]
    assert list(device.rounds) == ids[-4:]           # each round holds two pfn-space bitmaps
