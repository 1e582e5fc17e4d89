/*
 * vhost-user wire layouts, front-end <-> back-end (QEMU docs/interop/vhost-user.rst,
 * "Message format" and "Message types").  Every field is in the host's native byte order.
 *
 * This file is cffi cdef input: plain declarations and integer #defines only.  vballoon loads
 * it once (vballoon/wire.py); tests pin every size and offset to the specification's numbers.
 */

/* Header: 12 bytes.  flags bits 0-1 = version (1), bit 2 = REPLY, bit 3 = NEED_REPLY. */
struct vhost_user_header {
    uint32_t request;
    uint32_t flags;
    uint32_t size;          /* payload bytes that follow the header */
};

#define VHOST_USER_VERSION          0x1
#define VHOST_USER_VERSION_MASK     0x3
#define VHOST_USER_REPLY_MASK       0x4
#define VHOST_USER_NEED_REPLY_MASK  0x8
#define VHOST_USER_MAX_PAYLOAD      4096  /* larger than any payload this back-end accepts */
#define VHOST_USER_MAX_FDS          8     /* VHOST_MEMORY_BASELINE_NREGIONS */

/* SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE: 8 bytes. */
struct vhost_vring_state {
    uint32_t index;
    uint32_t num;
};

/* SET_VRING_ADDR: 40 bytes.  desc/used/avail are front-end virtual addresses. */
struct vhost_vring_addr {
    uint32_t index;
    uint32_t flags;         /* bit 0: VHOST_VRING_F_LOG */
    uint64_t desc_user_addr;
    uint64_t used_user_addr;
    uint64_t avail_user_addr;
    uint64_t log_guest_addr;
};

#define VHOST_VRING_F_LOG           0x1

/* SET_VRING_KICK / CALL / ERR payload (u64): bits 0-7 index, bit 8 "no fd attached". */
#define VHOST_USER_VRING_IDX_MASK   0xff
#define VHOST_USER_VRING_NOFD_MASK  0x100

/* SET_MEM_TABLE: an 8-byte header followed by nregions regions of 32 bytes each. */
struct vhost_user_memory_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;   /* offset of the region's first byte in its fd */
};

struct vhost_user_memory {
    uint32_t nregions;
    uint32_t padding;
};

#define VHOST_MEMORY_BASELINE_NREGIONS 8

/* GET_CONFIG / SET_CONFIG: 12-byte header followed by `size` bytes of config space. */
struct vhost_user_config {
    uint32_t offset;
    uint32_t size;
    uint32_t flags;         /* 0: front-end (driver) write, 1: live migration */
};

#define VHOST_USER_CONFIG_HDR_SIZE  12
#define VHOST_USER_MAX_CONFIG_SIZE  256
#define VHOST_SET_CONFIG_TYPE_FRONTEND  0
#define VHOST_SET_CONFIG_TYPE_MIGRATION 1

/* Front-end -> back-end request codes. */
#define VHOST_USER_GET_FEATURES            1
#define VHOST_USER_SET_FEATURES            2
#define VHOST_USER_SET_OWNER               3
#define VHOST_USER_RESET_OWNER             4
#define VHOST_USER_SET_MEM_TABLE           5
#define VHOST_USER_SET_LOG_BASE            6
#define VHOST_USER_SET_LOG_FD              7
#define VHOST_USER_SET_VRING_NUM           8
#define VHOST_USER_SET_VRING_ADDR          9
#define VHOST_USER_SET_VRING_BASE         10
#define VHOST_USER_GET_VRING_BASE         11
#define VHOST_USER_SET_VRING_KICK         12
#define VHOST_USER_SET_VRING_CALL         13
#define VHOST_USER_SET_VRING_ERR          14
#define VHOST_USER_GET_PROTOCOL_FEATURES  15
#define VHOST_USER_SET_PROTOCOL_FEATURES  16
#define VHOST_USER_GET_QUEUE_NUM          17
#define VHOST_USER_SET_VRING_ENABLE       18
#define VHOST_USER_SEND_RARP              19
#define VHOST_USER_NET_SET_MTU            20
#define VHOST_USER_SET_BACKEND_REQ_FD     21
#define VHOST_USER_IOTLB_MSG              22
#define VHOST_USER_SET_VRING_ENDIAN       23
#define VHOST_USER_GET_CONFIG             24
#define VHOST_USER_SET_CONFIG             25
#define VHOST_USER_CREATE_CRYPTO_SESSION  26
#define VHOST_USER_CLOSE_CRYPTO_SESSION   27
#define VHOST_USER_POSTCOPY_ADVISE        28
#define VHOST_USER_POSTCOPY_LISTEN        29
#define VHOST_USER_POSTCOPY_END           30
#define VHOST_USER_GET_INFLIGHT_FD        31
#define VHOST_USER_SET_INFLIGHT_FD        32
#define VHOST_USER_GPU_SET_SOCKET         33
#define VHOST_USER_RESET_DEVICE           34
#define VHOST_USER_VRING_KICK             35
#define VHOST_USER_GET_MAX_MEM_SLOTS      36
#define VHOST_USER_ADD_MEM_REG            37
#define VHOST_USER_REM_MEM_REG            38
#define VHOST_USER_SET_STATUS             39
#define VHOST_USER_GET_STATUS             40
#define VHOST_USER_GET_SHARED_OBJECT      41
#define VHOST_USER_SET_DEVICE_STATE_FD    42
#define VHOST_USER_CHECK_DEVICE_STATE     43
#define VHOST_USER_GET_SHMEM_CONFIG       44

/* Back-end -> front-end request codes (the backend channel, SET_BACKEND_REQ_FD). */
#define VHOST_USER_BACKEND_IOTLB_MSG          1
#define VHOST_USER_BACKEND_CONFIG_CHANGE_MSG  2

/* Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
#define VHOST_USER_PROTOCOL_F_MQ                   0
#define VHOST_USER_PROTOCOL_F_LOG_SHMFD            1
#define VHOST_USER_PROTOCOL_F_RARP                 2
#define VHOST_USER_PROTOCOL_F_REPLY_ACK            3
#define VHOST_USER_PROTOCOL_F_MTU                  4
#define VHOST_USER_PROTOCOL_F_BACKEND_REQ          5
#define VHOST_USER_PROTOCOL_F_CROSS_ENDIAN         6
#define VHOST_USER_PROTOCOL_F_CRYPTO_SESSION       7
#define VHOST_USER_PROTOCOL_F_PAGEFAULT            8
#define VHOST_USER_PROTOCOL_F_CONFIG               9
#define VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD     10
#define VHOST_USER_PROTOCOL_F_HOST_NOTIFIER       11
#define VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD      12
#define VHOST_USER_PROTOCOL_F_RESET_DEVICE        13
#define VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS 14
#define VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS 15
#define VHOST_USER_PROTOCOL_F_STATUS              16

/* Virtio feature bit 30 in GET/SET_FEATURES: the protocol-feature handshake exists. */
#define VHOST_USER_F_PROTOCOL_FEATURES 30
