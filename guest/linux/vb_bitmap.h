/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vballoon's free-page-bitmap queue, driver side (protocol/bitmap-queue.md).
 *
 * Linked into virtio_balloon_bitmap.ko together with the kernel's own
 * drivers/virtio/virtio_balloon.c, which virtio_balloon.patch hooks up to
 * these five calls.  One struct vb_bitmap per balloon device.
 */
#ifndef VB_BITMAP_H
#define VB_BITMAP_H

#include <linux/types.h>

struct virtio_device;
struct virtqueue;
struct vb_bitmap;

#define VIRTIO_BALLOON_F_FREE_PAGE_BITMAP	16

/* probe: allocate the request buffer, chunk buffers and the work queue. */
struct vb_bitmap *vb_bitmap_create(struct virtio_device *vdev);
/* After virtio_device_ready(): post the request buffer on @vq (probe, restore). */
int vb_bitmap_start(struct vb_bitmap *bm, struct virtqueue *vq);
/* Before the device is reset (remove, freeze): no more rounds, the work is idle. */
void vb_bitmap_stop(struct vb_bitmap *bm);
/* After virtio_reset_device(), before del_vqs: every buffer is the driver's again. */
void vb_bitmap_detach(struct vb_bitmap *bm);
/* After del_vqs (remove) or on probe failure: free everything. */
void vb_bitmap_destroy(struct vb_bitmap *bm);
/* From the bitmap queue's callback (interrupt context). */
void vb_bitmap_vq_done(struct vb_bitmap *bm);
/* validate(): may the bitmap feature stay offered?  (module parameter "enable") */
bool vb_bitmap_wanted(void);
/* validate(): keep VIRTIO_RING_F_INDIRECT_DESC?  (module parameter "indirect") */
bool vb_bitmap_want_indirect(void);

#endif
