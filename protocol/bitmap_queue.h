/*
 * virtio-balloon free-page-bitmap queue (vballoon extension; prose spec: bitmap-queue.md).
 * Modernised from Liang Li's 2016 v3 series (struct balloon_req_hdr, struct balloon_bmap_hdr).
 * Every field is little-endian; both structs are naturally aligned (no padding).
 *
 * cffi cdef input: declarations and integer #defines only.
 */

/* Request: the driver posts a 16-byte device-writable buffer; the device fills it and uses it. */
struct virtio_balloon_bitmap_req {
    uint16_t cmd;           /* VIRTIO_BALLOON_BITMAP_CMD_GET_FREE */
    uint16_t page_shift;    /* one bitmap bit per 2^page_shift bytes of guest-physical memory */
    uint32_t reserved;      /* 0 */
    uint64_t id;            /* the round's request id: fresh, never 0, never reused */
};

/*
 * Chunk: one descriptor chain, all device-readable.  Its readable bytes, concatenated, are this
 * 32-byte header followed by exactly 8 * ceil(nr_pfns / 64) bytes of bitmap; bit k of that
 * bitmap (byte k/8, bit k%8) is pfn start_pfn + k.
 */
struct virtio_balloon_bitmap_chunk {
    uint16_t cmd;           /* VIRTIO_BALLOON_BITMAP_CMD_GET_FREE, as in the request */
    uint16_t page_shift;    /* as in the request */
    uint16_t flags;         /* VIRTIO_BALLOON_BITMAP_F_DONE on the round's last chunk */
    uint16_t reserved;      /* 0 */
    uint64_t id;            /* the request id this chunk answers */
    uint64_t start_pfn;     /* pfn of bit 0; a multiple of 64 */
    uint64_t nr_pfns;       /* bits of bitmap: pfns covered, at most MAX_CHUNK_PFNS */
};

#define VIRTIO_BALLOON_F_FREE_PAGE_BITMAP      16   /* device-specific range 0-23; see spec 1 */

#define VIRTIO_BALLOON_BITMAP_CMD_GET_FREE     1
#define VIRTIO_BALLOON_BITMAP_F_DONE           1    /* flags: no more chunks for this id */
#define VIRTIO_BALLOON_BITMAP_PAGE_SHIFT       12   /* the page shift this device requests */

#define VIRTIO_BALLOON_BITMAP_REQ_SIZE         16
#define VIRTIO_BALLOON_BITMAP_CHUNK_HDR_SIZE   32
#define VIRTIO_BALLOON_BITMAP_PFN_ALIGN        64   /* start_pfn granularity (one le64 word) */
#define VIRTIO_BALLOON_BITMAP_PFNS_PER_BMAP    262144   /* one 32 KiB bitmap buffer (seed v3) */
#define VIRTIO_BALLOON_BITMAP_BMAP_BYTES       32768
#define VIRTIO_BALLOON_BITMAP_MAX_BMAPS        32       /* bitmap buffers per chain (seed v3) */
#define VIRTIO_BALLOON_BITMAP_MAX_CHUNK_PFNS   8388608  /* PFNS_PER_BMAP * MAX_BMAPS */
