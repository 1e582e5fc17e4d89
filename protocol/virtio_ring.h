/*
 * Split virtqueue layouts (VIRTIO 1.2 section 2.7).  Every field is little-endian.
 * cffi cdef input: declarations and integer #defines only.
 */

/* Descriptor table entry: 16 bytes, table aligned to 16. */
struct vring_desc {
    uint64_t addr;          /* guest-physical address */
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

#define VRING_DESC_F_NEXT      1
#define VRING_DESC_F_WRITE     2   /* device-writable ("in") buffer */
#define VRING_DESC_F_INDIRECT  4

/* Driver area: 6 + 2*num bytes (with used_event after ring[num]), aligned to 2. */
struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];        /* ring[num], then le16 used_event (EVENT_IDX) */
};

#define VRING_AVAIL_F_NO_INTERRUPT 1

/* Device area: 6 + 8*num bytes (with avail_event after ring[num]), aligned to 4. */
struct vring_used_elem {
    uint32_t id;            /* head descriptor index of the chain */
    uint32_t len;           /* bytes written into device-writable buffers */
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];  /* ring[num], then le16 avail_event (EVENT_IDX) */
};

#define VRING_USED_F_NO_NOTIFY 1

#define VIRTQ_MAX_SIZE 32768

/* Transport feature bits. */
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX     29
#define VIRTIO_F_VERSION_1          32
#define VIRTIO_F_ACCESS_PLATFORM    33
#define VIRTIO_F_RING_PACKED        34
