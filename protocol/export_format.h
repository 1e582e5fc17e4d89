/*
 * vballoon free-page map export file, version 1 (prose spec: export-format.md).
 * Every field is little-endian; every struct is naturally aligned (no padding).
 *
 * File = header (88 bytes) + nr_extents extents (16 bytes each) + payload:
 *   RANGES: nr_ranges ranges (16 bytes each), ascending and maximal;
 *   BITMAP: three bitmaps of ceil(max_pfn / 64) le64 words each -- free, covered, ballooned --
 *           bit k of a bitmap (word k / 64, bit k % 64) is pfn k.
 *
 * cffi cdef input: declarations and integer #defines only.
 */

struct vballoon_export_header {
    uint64_t magic;          /* VBALLOON_EXPORT_MAGIC: the bytes "VBFPMAP\n" */
    uint16_t version;        /* VBALLOON_EXPORT_VERSION */
    uint16_t page_shift;     /* one pfn = 2^page_shift bytes of guest-physical memory (12) */
    uint32_t payload;        /* VBALLOON_EXPORT_PAYLOAD_* */
    uint64_t round_id;       /* the round's id (bitmap request id or hint cmd_id) */
    uint8_t  kind;           /* VBALLOON_EXPORT_KIND_* */
    uint8_t  state;          /* VBALLOON_EXPORT_STATE_* when the file was written */
    uint16_t flags;          /* VBALLOON_EXPORT_F_* */
    uint32_t nr_extents;     /* RAM extents after the header */
    uint64_t max_pfn;        /* the pfn space is [0, max_pfn), holes included */
    uint64_t ram_pages;      /* pages inside the RAM extents */
    uint64_t covered_pages;  /* RAM pages the round said something about; coverage = covered/ram */
    uint64_t free_pages;     /* pages reported free (never in a hole) */
    uint64_t nr_ranges;      /* maximal runs of free pages */
    uint64_t requested_at_us;    /* when the round was requested: Unix time, microseconds */
    uint64_t finished_at_us;     /* when it ended; 0 while it runs */
};

/* The guest's RAM: one extent per memory region, sorted, disjoint. */
struct vballoon_export_extent {
    uint64_t start_pfn;
    uint64_t npages;
};

/* One free range of the RANGES payload: pfns [start_pfn, start_pfn + npages). */
struct vballoon_export_range {
    uint64_t start_pfn;
    uint64_t npages;
};

#define VBALLOON_EXPORT_MAGIC              0x0A50414D50464256   /* "VBFPMAP\n" read as le64 */
#define VBALLOON_EXPORT_VERSION            1
#define VBALLOON_EXPORT_HEADER_SIZE        88

#define VBALLOON_EXPORT_PAYLOAD_RANGES     1
#define VBALLOON_EXPORT_PAYLOAD_BITMAP     2

#define VBALLOON_EXPORT_KIND_BITMAP        1    /* the free-page-bitmap queue */
#define VBALLOON_EXPORT_KIND_HINT          2    /* VIRTIO_BALLOON_F_FREE_PAGE_HINT */

#define VBALLOON_EXPORT_STATE_REQUESTED    1
#define VBALLOON_EXPORT_STATE_RECEIVING    2
#define VBALLOON_EXPORT_STATE_DONE         3
#define VBALLOON_EXPORT_STATE_ABORTED      4

#define VBALLOON_EXPORT_F_COMPLETE         1    /* the guest finished the round (state DONE) */
