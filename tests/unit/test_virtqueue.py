"""Split virtqueue, device side: chain walking, hostile chains, used ring, EVENT_IDX."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from vballoon.errors import GuestError, GuestMemoryError
from vballoon.sim import GuestRam
from vballoon.testing.rigs import mapped, queue_pair
from vballoon.virtio._vring import ffi
from vballoon.virtio.virtqueue import VirtQueue
from vballoon.wire import C

NEXT, WRITE, INDIRECT = C.VRING_DESC_F_NEXT, C.VRING_DESC_F_WRITE, C.VRING_DESC_F_INDIRECT


@pytest.fixture
def setup(ram):
    with queue_pair(ram) as (mem, dq, vq):
        yield ram, mem, dq, vq


def test_pop_returns_none_on_an_empty_ring(setup):
    _, mem, _, vq = setup
    assert vq.pop(mem) is None


def test_chain_of_readable_then_writable_buffers(setup):
    ram, mem, dq, vq = setup
    a, b = ram.alloc(16), ram.alloc(32)
    head = dq.add([(a, 16, False), (b, 32, True)])
    chain = vq.pop(mem)
    assert chain.head == head
    assert [(x.addr, x.len, x.write) for x in chain.buffers] == [(a, 16, False), (b, 32, True)]


def test_indirect_chain(setup):
    ram, mem, dq, vq = setup
    a, b = ram.alloc(8), ram.alloc(8)
    dq.add([(a, 8, False), (b, 8, True)], indirect=True)
    chain = vq.pop(mem)
    assert [(x.addr, x.write) for x in chain.buffers] == [(a, False), (b, True)]


def test_used_ring_gets_element_then_index(setup):
    ram, mem, dq, vq = setup
    dq.add([(ram.alloc(8), 8, True)])
    dq.add([(ram.alloc(8), 8, True)])
    c1, c2 = vq.pop(mem), vq.pop(mem)
    vq.push(c2, 5)
    vq.push(c1, 7)
    assert [(u.head, u.len) for u in dq.reap()] == [(c2.head, 5), (c1.head, 7)]


def test_desc_loop_is_refused(setup):
    ram, mem, dq, vq = setup
    buf = ram.alloc(8)
    dq.write_desc(0, buf, 8, NEXT, 1)
    dq.write_desc(1, buf, 8, NEXT, 0)
    dq.publish(0)
    with pytest.raises(GuestError) as e:
        vq.pop(mem)
    assert e.value.rule == "desc-loop"


def test_next_beyond_queue_size_is_refused(setup):
    ram, mem, dq, vq = setup
    dq.write_desc(0, ram.alloc(8), 8, NEXT, 8)
    dq.publish(0)
    with pytest.raises(GuestError, match="desc-next-out-of-range"):
        vq.pop(mem)


def test_head_beyond_queue_size_is_refused(setup):
    _, mem, dq, vq = setup
    dq.publish(9)
    with pytest.raises(GuestError, match="desc-head-out-of-range"):
        vq.pop(mem)


def test_buffer_outside_guest_memory_is_refused(setup):
    ram, mem, dq, vq = setup
    dq.write_desc(0, ram.size - 4, 8, 0)
    dq.publish(0)
    with pytest.raises(GuestMemoryError, match="addr-outside-memory"):
        vq.pop(mem)


def test_chain_longer_than_2_32_bytes_is_refused():
    """§2.7.5.2: a chain's total length MUST NOT exceed 2^32 (descriptors may overlap)."""
    big = GuestRam([(0, 2 << 30)])        # sparse memfd: no host memory is used
    try:
        with queue_pair(big, indirect=False) as (mem, dq, vq):
            for i in range(3):
                dq.write_desc(i, 0, 0x7FFF_F000, NEXT if i < 2 else 0, i + 1)
            dq.publish(0)
            with pytest.raises(GuestError) as e:
                vq.pop(mem)
            assert e.value.rule == "chain-too-long"
    finally:
        big.close()


def test_nested_indirect_table_is_refused(setup):
    ram, mem, dq, vq = setup
    inner = ram.alloc(16, 16)
    outer = ram.alloc(16, 16)
    dq.write_desc(0, ram.alloc(8), 8, 0, table=inner)
    dq.write_desc(0, inner, 16, INDIRECT, table=outer)
    dq.write_desc(0, outer, 16, INDIRECT)
    dq.publish(0)
    with pytest.raises(GuestError, match="indirect-nested"):
        vq.pop(mem)


def test_indirect_with_next_is_refused(setup):
    ram, mem, dq, vq = setup
    table = ram.alloc(16, 16)
    dq.write_desc(0, ram.alloc(8), 8, 0, table=table)
    dq.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    dq.publish(0)
    with pytest.raises(GuestError, match="indirect-with-next"):
        vq.pop(mem)


def test_indirect_table_length_must_be_a_multiple_of_16(setup):
    ram, mem, dq, vq = setup
    dq.write_desc(0, ram.alloc(32, 16), 24, INDIRECT)
    dq.publish(0)
    with pytest.raises(GuestError, match="indirect-bad-length"):
        vq.pop(mem)


def test_indirect_without_the_feature_is_refused(setup):
    ram, mem, dq, vq = setup
    vq.indirect = False
    dq.add([(ram.alloc(8), 8, False)], indirect=True)
    with pytest.raises(GuestError, match="indirect-not-negotiated"):
        vq.pop(mem)


def test_readable_after_writable_is_refused(setup):
    ram, mem, dq, vq = setup
    dq.add([(ram.alloc(8), 8, True), (ram.alloc(8), 8, False)])
    with pytest.raises(GuestError, match="desc-read-after-write"):
        vq.pop(mem)


def test_avail_index_running_ahead_of_the_queue_size_is_refused(setup):
    ram, mem, dq, vq = setup
    for _ in range(9):
        dq.publish(0)
    with pytest.raises(GuestError, match="avail-idx-jump"):
        vq.pop(mem)


def test_push_of_a_head_not_in_flight_is_refused(setup):
    _, _, _, vq = setup
    with pytest.raises(GuestError, match="push-unknown-head"):
        vq.push(3, 0)


def test_ring_addresses_outside_memory_are_refused(ram):
    mem = mapped(ram)
    vq = VirtQueue(0)
    vq.num = 8
    vq.desc_addr = vq.avail_addr = vq.used_addr = ram.uva(0) + ram.size - 8
    with pytest.raises(GuestMemoryError):
        vq.attach(mem)
    mem.close()


def test_no_interrupt_flag_suppresses_notification(setup):
    ram, mem, dq, vq = setup
    dq.add([(ram.alloc(8), 8, True)])
    ram.at(dq.avail, 2)[:] = C.VRING_AVAIL_F_NO_INTERRUPT.to_bytes(2, "little")
    vq.push(vq.pop(mem), 0)
    assert not vq.should_notify()


def test_event_idx_notifies_only_when_used_event_is_crossed(setup):
    ram, mem, dq, vq = setup
    vq.event_idx = True
    used_event = dq.avail + 4 + 2 * dq.num
    for _ in range(3):
        dq.add([(ram.alloc(8), 8, True)])
    ram.at(used_event, 2)[:] = (1).to_bytes(2, "little")   # "interrupt me after used idx 1"
    vq.push(vq.pop(mem), 0)          # used idx 0 -> 1: used_event 1 not crossed yet
    assert vq.should_notify()        # first notification is always sent
    vq.push(vq.pop(mem), 0)          # 1 -> 2 crosses used_event 1
    assert vq.should_notify()
    vq.push(vq.pop(mem), 0)          # 2 -> 3: used_event still 1, already signalled
    assert not vq.should_notify()


def test_event_idx_publishes_avail_event(setup):
    ram, mem, dq, vq = setup
    vq.event_idx = True
    dq.add([(ram.alloc(8), 8, True)])
    vq.pop(mem)
    avail_event = dq.used + 4 + 8 * dq.num
    assert int.from_bytes(ram.at(avail_event, 2), "little") == 1


def test_stop_index_rewinds_over_held_chains(setup):
    ram, mem, dq, vq = setup
    dq.add([(ram.alloc(8), 8, False)])
    dq.add([(ram.alloc(8), 8, False)])
    done = vq.pop(mem)
    vq.pop(mem)                      # held by the device, like a stats buffer
    vq.push(done, 0)
    assert vq.stop_index() == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                          st.integers(0, 7), st.integers(0, 15)), min_size=8, max_size=8),
       st.integers(0, 9))
def test_any_descriptor_table_is_walked_or_refused_cleanly(descs, head):
    """Property: whatever the guest writes, pop() returns a chain inside memory or raises a
    GuestError; it never loops, over-reads or raises anything else."""
    ram = GuestRam([(0, 1 << 20)])
    try:
        with queue_pair(ram) as (mem, dq, vq):
            walk_or_refuse(mem, dq, vq, descs, head)
    finally:
        ram.close()


def walk_or_refuse(mem, dq, vq, descs, head):
    for i, (addr, length, flags, nxt) in enumerate(descs):
        dq.write_desc(i, addr, length, flags, nxt)
    dq.publish(head)
    try:
        chain = vq.pop(mem)
    except GuestError:
        return
    assert 1 <= len(chain.buffers) <= 8
    for b in chain.buffers:
        mem.check_gpa(b.addr, b.len)
    assert sum(b.len for b in chain.buffers) <= 1 << 32


def test_indirect_table_longer_than_the_queue_is_refused(setup):
    """§2.7.5.3.1: a chain (indirect ones included) MUST NOT be longer than the queue size."""
    ram, mem, dq, vq = setup
    table = ram.alloc(16 * 16, 16)
    for i in range(16):
        dq.write_desc(i, ram.alloc(8), 8, NEXT if i < 15 else 0, i + 1, table=table)
    dq.write_desc(0, table, 16 * 16, INDIRECT)
    dq.publish(0)
    with pytest.raises(GuestError, match="indirect-bad-length"):
        vq.pop(mem)


def test_indirect_table_outside_memory_is_refused(setup):
    _, mem, dq, vq = setup
    dq.write_desc(0, 1 << 40, 32, INDIRECT)
    dq.publish(0)
    with pytest.raises(GuestMemoryError, match="addr-outside-memory"):
        vq.pop(mem)


def test_chain_host_spans_point_at_the_buffers(setup):
    ram, mem, dq, vq = setup
    a = ram.alloc(16)
    ram.at(a, 16)[:] = b"0123456789abcdef"
    dq.add([(a, 16, False), (ram.alloc(8), 8, True)])
    chain = vq.pop(mem)
    ptrs, lens, n = chain.read_spans()
    assert n == 1 and lens[0] == 16 and ffi.buffer(ptrs[0], 16)[:] == b"0123456789abcdef"
    chain.forget_hosts()
    with pytest.raises(GuestError, match="chain-hosts-dropped"):
        chain.read_spans()


def test_item1_in_flight_bookkeeping_any_order_and_duplicate_heads(ram):
    """Pushing in any order is O(1) (a dict, not a list scan); a head published twice while
    in flight is in flight twice; a third push of it is the driver's error."""
    with queue_pair(ram, num=8) as (mem, dq, vq):
        buf = ram.alloc(8)
        heads = [dq.add([(buf, 8, False)]) for _ in range(6)]
        chains = [vq.pop(mem) for _ in range(6)]
        assert vq.in_flight == 6 and vq.stop_index() == 0
        for c in reversed(chains):
            vq.push(c)
        assert vq.in_flight == 0 and vq.stop_index() == 6
        dq.write_desc(7, buf, 8)
        dq.publish(7)
        dq.publish(7)                           # the same head twice
        a, b = vq.pop(mem), vq.pop(mem)
        assert a.head == b.head == 7 and vq.in_flight == 2
        vq.push(a)
        vq.push(b)
        with pytest.raises(GuestError, match="push-unknown-head"):
            vq.push(7)
        assert heads
