"""Every wire layout pinned to the specifications' numbers."""
from vballoon import wire
from vballoon.wire import C, ffi


def test_vhost_user_header_is_12_bytes_of_three_u32():
    assert ffi.sizeof("struct vhost_user_header") == 12
    assert [ffi.offsetof("struct vhost_user_header", f) for f in ("request", "flags", "size")] \
        == [0, 4, 8]


def test_vhost_user_payload_sizes_match_the_spec():
    assert ffi.sizeof("struct vhost_vring_state") == 8
    assert ffi.sizeof("struct vhost_vring_addr") == 40
    # used comes before avail in SET_VRING_ADDR
    assert ffi.offsetof("struct vhost_vring_addr", "desc_user_addr") == 8
    assert ffi.offsetof("struct vhost_vring_addr", "used_user_addr") == 16
    assert ffi.offsetof("struct vhost_vring_addr", "avail_user_addr") == 24
    assert ffi.offsetof("struct vhost_vring_addr", "log_guest_addr") == 32
    assert ffi.sizeof("struct vhost_user_memory") == 8
    assert ffi.sizeof("struct vhost_user_memory_region") == 32
    assert ffi.offsetof("struct vhost_user_memory_region", "mmap_offset") == 24
    assert ffi.sizeof("struct vhost_user_config") == C.VHOST_USER_CONFIG_HDR_SIZE == 12


def test_split_ring_layouts_match_virtio_2_7():
    assert ffi.sizeof("struct vring_desc") == 16
    assert [ffi.offsetof("struct vring_desc", f) for f in ("addr", "len", "flags", "next")] \
        == [0, 8, 12, 14]
    assert ffi.offsetof("struct vring_avail", "ring") == 4
    assert ffi.sizeof("struct vring_used_elem") == 8
    assert ffi.offsetof("struct vring_used", "ring") == 4


def test_balloon_config_is_16_bytes_and_stat_entry_is_10():
    assert ffi.sizeof("struct virtio_balloon_config") == 16
    assert [ffi.offsetof("struct virtio_balloon_config", f) for f in
            ("num_pages", "actual", "free_page_hint_cmd_id", "poison_val")] == [0, 4, 8, 12]
    assert ffi.sizeof("struct virtio_balloon_stat") == 10
    assert ffi.offsetof("struct virtio_balloon_stat", "val") == 2


def test_codecs_use_the_declared_byte_order():
    assert wire.DESC.struct.format == "<QIHH"
    assert wire.HEADER.struct.format == "=III"
    assert wire.BALLOON_STAT.struct.format == "<HQ"
    assert wire.DESC.pack(1, 2, 3, 4) == bytes.fromhex("0100000000000000" "02000000" "0300" "0400")


def test_constants_are_loaded_from_the_headers():
    assert C.VHOST_USER_GET_CONFIG == 24
    assert C.VHOST_USER_BACKEND_CONFIG_CHANGE_MSG == 2
    assert C.VIRTIO_F_VERSION_1 == 32
    assert C.VIRTIO_BALLOON_F_PAGE_REPORTING == 5
