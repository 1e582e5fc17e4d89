"""The vhost-user session as a pure state machine: messages in, replies and actions out."""
from __future__ import annotations

import os

import pytest

from vballoon.devices.balloon.device import Balloon
from vballoon.errors import FrontendError
from vballoon.sim import GuestRam
from vballoon.testing.rigs import SessionRig
from vballoon.vhost.session import F_PROTOCOL_FEATURES, Close, CloseFds, Session, Unwatch, Watch
from vballoon.wire import C, CONFIG, HEADER, MEM_REGION, MEMORY, U64, VRING_ADDR, VRING_STATE

NEED = C.VHOST_USER_VERSION | C.VHOST_USER_NEED_REPLY_MASK
V1 = C.VHOST_USER_VERSION


Harness = SessionRig


@pytest.fixture
def h():
    x = Harness()
    yield x
    x.close()


def eventfd():
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("flags,rule", [(0x2, "header-version"), (0x0, "header-version"),
                                        (0x5, "header-reply-bit"), (0x11, "header-reserved-flags")])
def test_header_framing_rules(flags, rule):
    with pytest.raises(FrontendError) as e:
        Session.check_header(C.VHOST_USER_GET_FEATURES, flags, 0)
    assert e.value.rule == rule


def test_oversized_payload_is_a_framing_error():
    with pytest.raises(FrontendError, match="header-size"):
        Session.check_header(C.VHOST_USER_SET_MEM_TABLE, V1, 4097)


def test_get_features_offers_version_1_and_protocol_features(h):
    features = U64.unpack(h.reply_payload(h.send(C.VHOST_USER_GET_FEATURES),
                                          C.VHOST_USER_GET_FEATURES))[0]
    assert features >> 32 & 1 and features & F_PROTOCOL_FEATURES
    assert not features >> C.VIRTIO_F_RING_PACKED & 1
    assert not features >> C.VIRTIO_F_ACCESS_PLATFORM & 1


def test_protocol_features_are_mq_reply_ack_config_backend_req(h):
    value = U64.unpack(h.reply_payload(h.send(C.VHOST_USER_GET_PROTOCOL_FEATURES),
                                       C.VHOST_USER_GET_PROTOCOL_FEATURES))[0]
    assert value == 0x229
    assert value < 1 << 20 and not value >> C.VHOST_USER_PROTOCOL_F_STATUS & 1


def test_unknown_request_gets_an_error_ack_not_silence(h):
    h.negotiate()
    assert h.ack(99) != 0


def test_unimplemented_request_without_need_reply_is_logged_only(h, caplog):
    assert h.send(C.VHOST_USER_SET_LOG_BASE, bytes(16)) is None
    assert "request-unsupported" in caplog.text


def test_unimplemented_request_with_explicit_reply_closes_the_connection(h):
    assert h.send(C.VHOST_USER_GET_MAX_MEM_SLOTS) is None
    assert isinstance(h.actions[-1], Close)


def test_payload_size_mismatch_gets_an_error_ack(h, caplog):
    h.negotiate()
    assert h.ack(C.VHOST_USER_SET_VRING_NUM, b"\0" * 4) != 0
    assert "payload-size" in caplog.text


def test_protocol_features_not_offered_are_refused(h):
    assert h.ack(C.VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(1 << 16)) != 0


def test_features_not_offered_are_refused(h):
    h.negotiate()
    assert h.ack(C.VHOST_USER_SET_FEATURES, U64.pack(1 << C.VIRTIO_F_RING_PACKED)) != 0


def test_vring_index_out_of_range(h, caplog):
    h.negotiate()
    assert h.ack(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(200, 64)) != 0
    assert "vring-index" in caplog.text


def test_vring_num_must_be_a_power_of_two(h):
    h.negotiate()
    assert h.ack(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 48)) != 0
    assert h.ack(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 65536)) != 0
    assert h.ack(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 64)) == 0


def test_get_queue_num_answers_the_device_maximum(h):
    h.negotiate()
    value = U64.unpack(h.reply_payload(h.send(C.VHOST_USER_GET_QUEUE_NUM),
                                       C.VHOST_USER_GET_QUEUE_NUM))[0]
    assert value == h.device.max_queues() == 6


def test_get_queue_num_without_mq_closes(h):
    h.send(C.VHOST_USER_GET_QUEUE_NUM)
    assert isinstance(h.actions[-1], Close)


def test_extra_fds_are_closed(h):
    h.negotiate()
    fds = [eventfd(), eventfd()]
    assert h.ack(C.VHOST_USER_SET_OWNER, fds=fds) == 0
    assert not any(is_open(fd) for fd in fds)


def test_kick_fd_missing_is_refused(h):
    h.negotiate()
    assert h.ack(C.VHOST_USER_SET_VRING_KICK, U64.pack(0)) != 0


def test_call_with_an_extra_fd_keeps_one_and_closes_the_other(h):
    h.negotiate()
    keep, extra = eventfd(), eventfd()
    assert h.ack(C.VHOST_USER_SET_VRING_CALL, U64.pack(0), [keep, extra]) == 0
    assert is_open(keep) and not is_open(extra)
    assert h.s.rings[0].call_fd == keep


def test_call_nofd_means_no_signalling(h):
    h.negotiate()
    assert h.ack(C.VHOST_USER_SET_VRING_CALL, U64.pack(0x100)) == 0
    assert h.s.rings[0].call_fd is None


def mem_table(*regions):
    return MEMORY.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)


def test_mem_table_fd_count_must_match(h):
    h.negotiate()
    ram = GuestRam(1 << 20)
    fd = os.dup(ram.fd)
    assert h.ack(C.VHOST_USER_SET_MEM_TABLE, mem_table((0, 1 << 20, 0x10000, 0),
                                                       (1 << 30, 1 << 20, 1 << 40, 0)), [fd]) != 0
    assert not is_open(fd)
    ram.close()


def test_overlapping_regions_are_refused(h, caplog):
    h.negotiate()
    ram = GuestRam(2 << 20)
    fds = [os.dup(ram.fd), os.dup(ram.fd)]
    assert h.ack(C.VHOST_USER_SET_MEM_TABLE,
                 mem_table((0, 1 << 20, 1 << 30, 0), (0x80000, 1 << 20, 1 << 31, 1 << 20)),
                 fds) != 0
    assert "mem-region-overlap" in caplog.text
    assert not any(is_open(fd) for fd in fds)
    ram.close()


def test_region_past_the_end_of_its_fd_is_refused(h, caplog):
    h.negotiate()
    ram = GuestRam(1 << 20)
    fd = os.dup(ram.fd)
    assert h.ack(C.VHOST_USER_SET_MEM_TABLE, mem_table((0, 1 << 20, 1 << 30, 4096)), [fd]) != 0
    assert "mem-region-past-fd" in caplog.text
    assert not is_open(fd)
    ram.close()


def test_region_overflowing_64_bits_is_refused(h, caplog):
    h.negotiate()
    ram = GuestRam(1 << 20)
    assert h.ack(C.VHOST_USER_SET_MEM_TABLE,
                 mem_table((2**64 - 4096, 1 << 20, 0, 0)), [os.dup(ram.fd)]) != 0
    assert "mem-region-overflow" in caplog.text
    ram.close()


def test_ring_address_outside_memory_is_refused(h, caplog):
    h.negotiate()
    ram = GuestRam(1 << 20)
    r = ram.regions[0]
    assert h.ack(C.VHOST_USER_SET_MEM_TABLE, mem_table((r.guest_phys_addr, r.memory_size,
                                                       r.userspace_addr, r.mmap_offset)),
                 [os.dup(ram.fd)]) == 0
    h.send(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 64))
    far = ram.regions[0].userspace_addr + (2 << 20)
    assert h.ack(C.VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(0, 0, far, far, far, 0)) != 0
    assert "vring-addr-outside-memory" in caplog.text
    ram.close()


def test_ring_address_before_mem_table_is_refused(h, caplog):
    h.negotiate()
    h.send(C.VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 64))
    assert h.ack(C.VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(0, 0, 0, 0, 0, 0)) != 0
    assert "vring-addr-before-mem-table" in caplog.text


def test_misaligned_ring_address_is_refused(h):
    h.negotiate()
    assert h.ack(C.VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(0, 0, 8, 0, 0, 0)) != 0


def test_kick_on_a_ring_not_set_up_is_logged_and_ignored(h, caplog):
    h.negotiate()
    h.s.kick(0)
    assert "kick-before-setup" in caplog.text


def test_get_config_returns_the_16_byte_balloon_config():
    h = Harness(Balloon())
    h.device.num_pages = 1234
    reply = h.reply_payload(h.send(C.VHOST_USER_GET_CONFIG, CONFIG.pack(0, 16, 0) + bytes(16)),
                            C.VHOST_USER_GET_CONFIG)
    assert CONFIG.unpack_from(reply) == (0, 16, 0)
    assert int.from_bytes(reply[12:16], "little") == 1234
    h.close()


def test_get_config_beyond_the_config_space_gets_an_empty_reply(h, caplog):
    reply = h.send(C.VHOST_USER_GET_CONFIG, CONFIG.pack(0, 24, 0) + bytes(24))
    assert HEADER.unpack_from(reply) == (C.VHOST_USER_GET_CONFIG, 0x5, 0)
    assert "config-range" in caplog.text


def test_get_config_size_field_must_match_the_payload(h):
    reply = h.send(C.VHOST_USER_GET_CONFIG, CONFIG.pack(0, 16, 0) + bytes(8))
    assert HEADER.unpack_from(reply)[2] == 0


def test_backend_req_fd_needs_the_feature(h):
    a, b = os.pipe()
    os.close(b)
    assert h.ack(C.VHOST_USER_SET_BACKEND_REQ_FD, fds=[a]) != 0
    assert not is_open(a)


def test_enable_without_protocol_features_acked_is_refused(h):
    h.negotiate()
    h.send(C.VHOST_USER_SET_FEATURES, U64.pack(1 << 32))
    assert h.ack(C.VHOST_USER_SET_VRING_ENABLE, VRING_STATE.pack(0, 1)) != 0


def test_features_without_bit_30_enable_every_ring(h):
    h.send(C.VHOST_USER_SET_FEATURES, U64.pack(1 << 32))
    assert all(r.enabled for r in h.s.rings)


def test_close_closes_every_fd_once(h):
    h.negotiate()
    fds = [eventfd() for _ in range(3)]
    h.send(C.VHOST_USER_SET_VRING_CALL, U64.pack(0), [fds[0]])
    h.send(C.VHOST_USER_SET_VRING_ERR, U64.pack(0), [fds[1]])
    h.send(C.VHOST_USER_SET_VRING_KICK, U64.pack(1), [fds[2]])
    assert h.kinds() == [Watch]
    h.s.close()
    assert [t for t in h.kinds() if t is not CloseFds] == [Watch, Unwatch]
    assert not any(is_open(fd) for fd in fds)


def test_message_after_close_is_refused(h):
    h.s.close()
    with pytest.raises(FrontendError, match="session-closed"):
        h.send(C.VHOST_USER_GET_FEATURES)


def test_reset_owner_stops_and_disables_every_ring(h):
    h.negotiate()
    h.send(C.VHOST_USER_SET_FEATURES, U64.pack(1 << 32 | F_PROTOCOL_FEATURES))
    h.send(C.VHOST_USER_SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
    kick = eventfd()
    h.send(C.VHOST_USER_SET_VRING_KICK, U64.pack(0), [kick])
    assert h.ack(C.VHOST_USER_RESET_OWNER) == 0
    assert not h.s.rings[0].enabled and h.s.rings[0].kick_fd is None and not h.s.features_set
    assert not is_open(kick)
