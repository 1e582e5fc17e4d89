/*
 * virtio-balloon device (virtio id 5) layouts: VIRTIO 1.2 section 5.5.  Little-endian.
 * cffi cdef input: declarations and integer #defines only, loaded with packed=True
 * (struct virtio_balloon_stat is 10 bytes on the wire).
 */

/* Device configuration space: 16 bytes (QEMU: -device ...,config_size=16). */
struct virtio_balloon_config {
    uint32_t num_pages;             /* device: the number of pages the host wants ballooned */
    uint32_t actual;                /* driver: the number of pages in the balloon now */
    uint32_t free_page_hint_cmd_id; /* device: the current hint round (FREE_PAGE_HINT) */
    uint32_t poison_val;            /* driver: value freed pages hold (PAGE_POISON) */
};

/* One statistics entry: 10 bytes, packed {le16 tag, le64 val}. */
struct virtio_balloon_stat {
    uint16_t tag;
    uint64_t val;
};

#define VIRTIO_ID_BALLOON                    5
#define VIRTIO_BALLOON_PFN_SHIFT             12   /* inflate/deflate pfns are 4 KiB frames */

#define VIRTIO_BALLOON_F_MUST_TELL_HOST      0
#define VIRTIO_BALLOON_F_STATS_VQ            1
#define VIRTIO_BALLOON_F_DEFLATE_ON_OOM      2
#define VIRTIO_BALLOON_F_FREE_PAGE_HINT      3
#define VIRTIO_BALLOON_F_PAGE_POISON         4
#define VIRTIO_BALLOON_F_PAGE_REPORTING      5

#define VIRTIO_BALLOON_CMD_ID_STOP           0
#define VIRTIO_BALLOON_CMD_ID_DONE           1

#define VIRTIO_BALLOON_S_SWAP_IN             0
#define VIRTIO_BALLOON_S_SWAP_OUT            1
#define VIRTIO_BALLOON_S_MAJFLT              2
#define VIRTIO_BALLOON_S_MINFLT              3
#define VIRTIO_BALLOON_S_MEMFREE             4
#define VIRTIO_BALLOON_S_MEMTOT              5
#define VIRTIO_BALLOON_S_AVAIL               6
#define VIRTIO_BALLOON_S_CACHES              7
#define VIRTIO_BALLOON_S_HTLB_PGALLOC        8
#define VIRTIO_BALLOON_S_HTLB_PGFAIL         9
#define VIRTIO_BALLOON_S_OOM_KILL           10
#define VIRTIO_BALLOON_S_ALLOC_STALL        11
#define VIRTIO_BALLOON_S_ASYNC_SCAN         12
#define VIRTIO_BALLOON_S_DIRECT_SCAN        13
#define VIRTIO_BALLOON_S_ASYNC_RECLAIM      14
#define VIRTIO_BALLOON_S_DIRECT_RECLAIM     15
#define VIRTIO_BALLOON_S_NR                 16
