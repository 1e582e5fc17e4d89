// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * vballoon's free-page-bitmap queue, driver side (protocol/bitmap-queue.md).
 *
 * The device asks with a request buffer (cmd GET_FREE, page shift 12, id); the
 * driver answers with chunks, one descriptor chain each: a 32-byte header and
 * the bitmap of a window of pfns, in 32 KiB buffers.  Every chunk but the last
 * carries flags 0 (CONT), the last carries DONE.
 *
 * The bitmap is filled from the buddy allocator's free lists,
 * zone->free_area[order].free_list[migratetype], walked under zone->lock with
 * interrupts off: a bit is set only for a page inside a block that is on a
 * free list while the lock is held, so no page is reported that was not free
 * at the moment of its scan.  The lock is dropped every blocks_per_lock list
 * entries, or after max_hold_us (checked every 64 entries); the walk then resumes at the next entry if that page is still a
 * free block of the same zone (a PageBuddy page is always on one of its zone's
 * free lists), and otherwise starts the list again (at most twice), then gives
 * it up: under-reporting is allowed, long interrupt-off stalls are not.
 *
 * Concurrency: one ordered work item does every virtqueue operation (add,
 * get_buf, kick); the queue callback only wakes it.  A chunk buffer is
 * rewritten only after the device has used it (bm->chunk[i].busy), whatever
 * became of its round; remove/freeze reset the device before the buffers are
 * taken back and freed.
 */
#include <linux/module.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/scatterlist.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/huge_mm.h>
#include <linux/memory_hotplug.h>
#include <linux/nodemask.h>
#include <linux/cpumask.h>
#include <linux/percpu.h>
#include <linux/bitmap.h>
#include <linux/slab.h>
#include <linux/workqueue.h>
#include <linux/wait.h>
#include <linux/sched/clock.h>
#include <linux/ktime.h>
#include "vb_bitmap.h"

#ifdef __BIG_ENDIAN
#error "bitmaps are filled as native unsigned longs: a little-endian guest is required"
#endif

/* protocol/bitmap_queue.h */
struct vb_req {
	__le16 cmd;
	__le16 page_shift;
	__le32 reserved;
	__le64 id;
};

struct vb_chunk_hdr {
	__le16 cmd;
	__le16 page_shift;
	__le16 flags;
	__le16 reserved;
	__le64 id;
	__le64 start_pfn;
	__le64 nr_pfns;
};

#define VB_CMD_GET_FREE		1
#define VB_F_DONE		1
#define VB_PAGE_SHIFT		12
#define VB_PFN_ALIGN		64UL
#define VB_PFNS_PER_BMAP	262144UL
#define VB_BMAP_BYTES		32768U
#define VB_MAX_BMAPS		32U
#define VB_MAX_CHUNK_PFNS	(VB_PFNS_PER_BMAP * VB_MAX_BMAPS)
#define VB_NR_CHUNKS		2	/* one in the device's hands, one being filled */
#define VB_RESTARTS		2	/* times a list walk may start over after a lock drop */

static_assert(sizeof(struct vb_req) == 16);
static_assert(sizeof(struct vb_chunk_hdr) == 32);
static_assert(VB_BMAP_BYTES * 8 == VB_PFNS_PER_BMAP);

/* ---- module parameters: knobs, and figures a test can read ---- */

static bool enable = true;
module_param(enable, bool, 0444);
MODULE_PARM_DESC(enable, "Ack VIRTIO_BALLOON_F_FREE_PAGE_BITMAP (16) when offered");

static bool indirect = true;
module_param(indirect, bool, 0444);
MODULE_PARM_DESC(indirect, "Keep VIRTIO_RING_F_INDIRECT_DESC when the bitmap queue is used");

static unsigned long window_pfns = VB_MAX_CHUNK_PFNS;
module_param(window_pfns, ulong, 0644);
MODULE_PARM_DESC(window_pfns, "Pfns per chunk (rounded down to 64, at most 8388608 and what the buffers hold)");

static unsigned int blocks_per_lock = 2048;
module_param(blocks_per_lock, uint, 0644);
MODULE_PARM_DESC(blocks_per_lock, "Free-list entries visited per zone->lock hold (interrupts off)");

static unsigned int max_hold_us = 500;
module_param(max_hold_us, uint, 0644);
MODULE_PARM_DESC(max_hold_us, "Also drop zone->lock after this long (checked every 64 entries; 0: no time bound)");

static bool scan_pcp;
module_param(scan_pcp, bool, 0644);
MODULE_PARM_DESC(scan_pcp, "Also report pages on the per-CPU free lists (under pcp->lock)");

static unsigned int chunk_timeout_ms = 5000;
module_param(chunk_timeout_ms, uint, 0644);
MODULE_PARM_DESC(chunk_timeout_ms, "Give a round up when the device keeps every chunk buffer this long");

static unsigned int chunk_delay_ms;
module_param(chunk_delay_ms, uint, 0644);
MODULE_PARM_DESC(chunk_delay_ms, "Testing: pause before each chunk after the first (stretches a round)");

static unsigned long max_lock_hold_ns;
module_param(max_lock_hold_ns, ulong, 0644);
MODULE_PARM_DESC(max_lock_hold_ns, "Longest zone->lock/pcp->lock hold with interrupts off, ns (write 0 to reset)");

/* Lock holds by duration: < 64 us, < 256 us, < 1 ms, < 4 ms, longer (write 0,0,0,0,0 to reset). */
static unsigned long hold_hist[5];
module_param_array(hold_hist, ulong, NULL, 0644);
MODULE_PARM_DESC(hold_hist, "Lock holds with interrupts off: <64us,<256us,<1ms,<4ms,longer");

static unsigned long long last_round_id;
module_param(last_round_id, ullong, 0444);
static unsigned int last_round_chunks;
module_param(last_round_chunks, uint, 0444);
static unsigned long last_round_free_pages;
module_param(last_round_free_pages, ulong, 0444);
static unsigned long last_round_ns;
module_param(last_round_ns, ulong, 0444);
MODULE_PARM_DESC(last_round_ns, "Request taken -> DONE chunk queued, ns");
static unsigned long last_round_max_hold_ns;
module_param(last_round_max_hold_ns, ulong, 0444);
static unsigned long last_round_lock_holds;
module_param(last_round_lock_holds, ulong, 0444);
static unsigned long last_round_cut_lists;
module_param(last_round_cut_lists, ulong, 0444);
MODULE_PARM_DESC(last_round_cut_lists, "Free lists given up after lock drops (under-reported)");
static unsigned int rounds_done;
module_param(rounds_done, uint, 0444);
static unsigned int rounds_superseded;
module_param(rounds_superseded, uint, 0444);
static unsigned int rounds_abandoned;
module_param(rounds_abandoned, uint, 0444);
MODULE_PARM_DESC(rounds_abandoned, "Rounds given up: the device held the chunk buffers, or a queue error");
static unsigned int requests_ignored;
module_param(requests_ignored, uint, 0444);
MODULE_PARM_DESC(requests_ignored, "Requests with an unknown cmd or page shift, or id 0 (no answer)");

/* ---- state ---- */

struct vb_chunk {
	struct vb_chunk_hdr *hdr;		/* kmalloc: DMA-able */
	void *bmap[VB_MAX_BMAPS];		/* VB_BMAP_BYTES each, from the page allocator */
	bool busy;				/* in the ring: the device may read it */
};

struct vb_bitmap {
	struct virtio_device *vdev;
	struct virtqueue *vq;			/* set by start */
	struct workqueue_struct *wq;
	struct work_struct work;
	wait_queue_head_t used;			/* the device used a buffer, or stop */

	spinlock_t lock;			/* protects pending_id and stopping */
	u64 pending_id;				/* newest request not yet taken (0: none) */
	bool stopping;

	/* The work item's own (start and detach run when it cannot) */
	struct vb_req *req;			/* kmalloc, device-writable */
	bool req_posted;
	unsigned int nbmap;			/* bitmap buffers per chunk */
	unsigned int busy;			/* chunks the device holds */
	struct vb_chunk chunk[VB_NR_CHUNKS];
	struct scatterlist sg[1 + VB_MAX_BMAPS];
};

struct vb_scan {
	unsigned long free_pages;
	unsigned long max_hold_ns;
	unsigned long holds;
	unsigned long cut_lists;
};

bool vb_bitmap_wanted(void)
{
	return enable;
}

bool vb_bitmap_want_indirect(void)
{
	return indirect;
}

static bool vb_stopping(struct vb_bitmap *bm)
{
	return READ_ONCE(bm->stopping);
}

/* The end of the highest online node: max_pfn is not exported. */
static unsigned long vb_max_pfn(void)
{
	unsigned long max = 0;
	int nid;

	for_each_online_node(nid)
		max = max(max, pgdat_end_pfn(NODE_DATA(nid)));
	return max;
}

/* ---- the bitmap of one chunk: nbmap buffers of VB_PFNS_PER_BMAP bits ---- */

static void vb_set_bits(struct vb_chunk *c, unsigned long bit, unsigned long len)
{
	while (len) {
		unsigned long b = bit / VB_PFNS_PER_BMAP, off = bit % VB_PFNS_PER_BMAP;
		unsigned long n = min(len, VB_PFNS_PER_BMAP - off);

		bitmap_set(c->bmap[b], off, n);
		bit += n;
		len -= n;
	}
}

static void vb_mark(struct vb_chunk *c, unsigned long pfn, unsigned int order,
		    unsigned long lo, unsigned long hi, struct vb_scan *st)
{
	unsigned long start = max(pfn, lo), end = min(pfn + (1UL << order), hi);

	if (start < end)
		vb_set_bits(c, start - lo, end - start);
}

/* Interrupts-off time, recorded once per hold. */
static void vb_note_hold(u64 ns, struct vb_scan *st)
{
	unsigned int b = ns < 64000 ? 0 : ns < 256000 ? 1 : ns < 1000000 ? 2 : ns < 4000000 ? 3 : 4;

	WRITE_ONCE(hold_hist[b], hold_hist[b] + 1);
	st->holds++;
	if (ns > st->max_hold_ns)
		st->max_hold_ns = ns;
	if (ns > READ_ONCE(max_lock_hold_ns))
		WRITE_ONCE(max_lock_hold_ns, ns);
}

/* Is @pos one of @zone's free-list heads (the end of whatever list we are on)? */
static bool vb_is_head(struct zone *zone, struct list_head *pos)
{
	return (void *)pos >= (void *)zone->free_area &&
	       (void *)pos < (void *)(zone->free_area + NR_PAGE_ORDERS);
}

/*
 * One free list, zone->free_area[order].free_list[mt], in holds of at most
 * blocks_per_lock entries.  Each entry's order is read from the page itself
 * (page_private of a PageBuddy page, stable under zone->lock), so a walk that
 * resumed on a page since moved to another list of the zone stays correct: it
 * ends at that list's head.
 */
static void vb_scan_list(struct zone *zone, unsigned int order, unsigned int mt,
			 struct vb_chunk *c, unsigned long lo, unsigned long hi,
			 struct vb_scan *st)
{
	struct list_head *head = &zone->free_area[order].free_list[mt];
	unsigned int budget = max(READ_ONCE(blocks_per_lock), 1U);
	u64 max_ns = (u64)READ_ONCE(max_hold_us) * NSEC_PER_USEC;
	unsigned long cursor = 0, visited = 0, limit = 0;
	unsigned int restarts = 0;
	bool resume = false;

	if (data_race(list_empty(head)))
		return;
	for (;;) {
		struct list_head *pos = NULL;
		unsigned long flags;
		unsigned int n = 0;
		u64 t0;

		spin_lock_irqsave(&zone->lock, flags);
		t0 = local_clock();
		if (!resume) {
			pos = head->next;
			/* Bounds the walk when the list keeps growing behind us. */
			limit = 2 * zone->free_area[order].nr_free + budget;
		} else {
			struct page *page = pfn_to_online_page(cursor);

			if (page && page_zone(page) == zone && PageBuddy(page))
				pos = &page->buddy_list;
			else if (++restarts <= VB_RESTARTS)
				pos = head->next;
		}
		while (pos && !vb_is_head(zone, pos) && n < budget && visited < limit) {
			struct page *page = list_entry(pos, struct page, buddy_list);
			unsigned long ord = page_private(page);

			if (likely(PageBuddy(page) && ord <= MAX_PAGE_ORDER))
				vb_mark(c, page_to_pfn(page), ord, lo, hi, st);
			n++;
			visited++;
			pos = pos->next;
			if (max_ns && !(n % 64) && local_clock() - t0 > max_ns)
				break;
		}
		resume = pos && !vb_is_head(zone, pos);
		if (resume)
			cursor = page_to_pfn(list_entry(pos, struct page, buddy_list));
		vb_note_hold(local_clock() - t0, st);
		spin_unlock_irqrestore(&zone->lock, flags);

		if (!pos || (resume && visited >= limit)) {
			st->cut_lists++;	/* gave up: the rest is unknown */
			return;
		}
		if (!resume)
			return;
		cond_resched();
	}
}

#ifdef CONFIG_TRANSPARENT_HUGEPAGE
#define VB_PCP_THP_ORDER HPAGE_PMD_ORDER
#else
#define VB_PCP_THP_ORDER 0
#endif

/* mm/page_alloc.c's pindex_to_order(), which is static there. */
static unsigned int vb_pindex_to_order(unsigned int pindex)
{
	if (pindex >= NR_LOWORDER_PCP_LISTS)
		return VB_PCP_THP_ORDER;
	return pindex / MIGRATE_PCPTYPES;
}

/* Pages on the per-CPU lists are free too (not PageBuddy: the oracle misses them). */
static void vb_scan_pcp(struct zone *zone, struct vb_chunk *c, unsigned long lo,
			unsigned long hi, struct vb_scan *st)
{
	unsigned int budget = max(READ_ONCE(blocks_per_lock), 1U);
	int cpu;

	for_each_online_cpu(cpu) {
		struct per_cpu_pages *pcp = per_cpu_ptr(zone->per_cpu_pageset, cpu);
		unsigned long flags;
		unsigned int i, n = 0;
		u64 t0;

		spin_lock_irqsave(&pcp->lock, flags);
		t0 = local_clock();
		for (i = 0; i < NR_PCP_LISTS && n < budget; i++) {
			unsigned int order = vb_pindex_to_order(i);
			struct page *page;

			list_for_each_entry(page, &pcp->lists[i], pcp_list) {
				if (n++ >= budget)
					break;
				vb_mark(c, page_to_pfn(page), order, lo, hi, st);
			}
		}
		vb_note_hold(local_clock() - t0, st);
		spin_unlock_irqrestore(&pcp->lock, flags);
		cond_resched();
	}
}

/* Every populated zone of every online node that meets [lo, hi). */
static void vb_scan(struct vb_chunk *c, unsigned long lo, unsigned long hi,
		    struct vb_scan *st)
{
	int nid;

	for_each_online_node(nid) {
		pg_data_t *pgdat = NODE_DATA(nid);
		int z;

		for (z = 0; z < MAX_NR_ZONES; z++) {
			struct zone *zone = &pgdat->node_zones[z];
			unsigned int order, mt;

			if (!populated_zone(zone) || zone_end_pfn(zone) <= lo ||
			    zone->zone_start_pfn >= hi)
				continue;
			for (order = 0; order < NR_PAGE_ORDERS; order++)
				for (mt = 0; mt < MIGRATE_TYPES; mt++)
					vb_scan_list(zone, order, mt, c, lo, hi, st);
			if (READ_ONCE(scan_pcp))
				vb_scan_pcp(zone, c, lo, hi, st);
			cond_resched();
		}
	}
}

/* ---- the queue: only the work item calls these (or start/detach, when it cannot run) ---- */

static void vb_take_request(struct vb_bitmap *bm, unsigned int len)
{
	u16 cmd = le16_to_cpu(bm->req->cmd), shift = le16_to_cpu(bm->req->page_shift);
	u64 id = le64_to_cpu(bm->req->id);

	if (len < sizeof(*bm->req))
		return;			/* handed back unused */
	if (cmd != VB_CMD_GET_FREE || shift != VB_PAGE_SHIFT || !id) {
		WRITE_ONCE(requests_ignored, requests_ignored + 1);
		dev_warn_ratelimited(&bm->vdev->dev,
				     "bitmap request cmd %u page_shift %u id %llu ignored\n",
				     cmd, shift, id);
		return;
	}
	spin_lock_irq(&bm->lock);
	bm->pending_id = id;		/* a newer request supersedes one not yet taken */
	spin_unlock_irq(&bm->lock);
}

/* Take back every buffer the device used.  Never sleeps: a wait_event condition. */
static void vb_reap(struct vb_bitmap *bm)
{
	unsigned int len;
	void *token;

	while ((token = virtqueue_get_buf(bm->vq, &len))) {
		if (token == bm->req) {
			bm->req_posted = false;
			vb_take_request(bm, len);
		} else {
			struct vb_chunk *c = token;

			if (WARN_ON_ONCE(!c->busy))
				continue;
			c->busy = false;
			bm->busy--;
		}
	}
}

static void vb_post_request(struct vb_bitmap *bm)
{
	struct scatterlist sg;
	int err;

	if (bm->req_posted)
		return;
	memset(bm->req, 0, sizeof(*bm->req));
	sg_init_one(&sg, bm->req, sizeof(*bm->req));
	err = virtqueue_add_inbuf(bm->vq, &sg, 1, bm->req, GFP_KERNEL);
	if (err) {	/* the ring is full of chunks: posted again once one is back */
		dev_dbg(&bm->vdev->dev, "bitmap request buffer not posted: %d\n", err);
		return;
	}
	bm->req_posted = true;
	virtqueue_kick(bm->vq);
}

/* Wait until the device gives a chunk back, or stop, or chunk_timeout_ms. */
static bool vb_wait_chunk(struct vb_bitmap *bm)
{
	unsigned int busy = bm->busy;

	wait_event_timeout(bm->used, (vb_reap(bm), bm->busy < busy) || vb_stopping(bm),
			   msecs_to_jiffies(READ_ONCE(chunk_timeout_ms)));
	return bm->busy < busy && !vb_stopping(bm);
}

static struct vb_chunk *vb_idle_chunk(struct vb_bitmap *bm)
{
	unsigned int i;

	for (i = 0; i < VB_NR_CHUNKS; i++)
		if (!bm->chunk[i].busy)
			return &bm->chunk[i];
	return NULL;
}

static bool vb_superseded(struct vb_bitmap *bm)
{
	return READ_ONCE(bm->pending_id) != 0;
}

/* Buffers that fit the ring even without indirect descriptors (+1: header, +1: request). */
static unsigned int vb_usable_bmaps(struct vb_bitmap *bm)
{
	unsigned int ring = virtqueue_get_vring_size(bm->vq);

	return min(bm->nbmap, ring > 2 ? ring - 2 : 1);
}

static void vb_round(struct vb_bitmap *bm, u64 id)
{
	unsigned long max = vb_max_pfn(), pfn = 0;
	unsigned long window = min(READ_ONCE(window_pfns), VB_MAX_CHUNK_PFNS);
	u64 t0 = ktime_get_ns();
	struct vb_scan st = {};
	unsigned int chunks = 0;
	bool done = false;

	window = min(window, vb_usable_bmaps(bm) * VB_PFNS_PER_BMAP);
	window = max(round_down(window, VB_PFN_ALIGN), VB_PFN_ALIGN);
	do {
		unsigned long end, nbytes;
		struct vb_chunk *c;
		unsigned int nb, b;
		int err;

		if (chunks && READ_ONCE(chunk_delay_ms))	/* testing only */
			wait_event_timeout(bm->used, vb_stopping(bm),
					   msecs_to_jiffies(READ_ONCE(chunk_delay_ms)));
		vb_reap(bm);
		vb_post_request(bm);
		if (vb_stopping(bm))
			return;
		if (vb_superseded(bm)) {
			WRITE_ONCE(rounds_superseded, rounds_superseded + 1);
			return;		/* no DONE: the device dropped this id already */
		}
		c = vb_idle_chunk(bm);
		if (!c) {
			if (!vb_wait_chunk(bm))
				goto abandon;
			continue;
		}

		end = min(pfn + window, max);
		done = end >= max;
		nbytes = DIV_ROUND_UP(end - pfn, 64) * 8;
		nb = DIV_ROUND_UP(nbytes, VB_BMAP_BYTES);	/* <= vb_usable_bmaps(): window */
		for (b = 0; b < nb; b++)
			memset(c->bmap[b], 0, min_t(unsigned long, VB_BMAP_BYTES,
						    nbytes - b * VB_BMAP_BYTES));
		vb_scan(c, pfn, end, &st);
		for (b = 0; b < nb; b++)	/* pages reported, each once */
			st.free_pages += bitmap_weight(c->bmap[b], min(VB_PFNS_PER_BMAP,
								   end - pfn - b * VB_PFNS_PER_BMAP));

		c->hdr->cmd = cpu_to_le16(VB_CMD_GET_FREE);
		c->hdr->page_shift = cpu_to_le16(VB_PAGE_SHIFT);
		c->hdr->flags = cpu_to_le16(done ? VB_F_DONE : 0);
		c->hdr->reserved = 0;
		c->hdr->id = cpu_to_le64(id);
		c->hdr->start_pfn = cpu_to_le64(pfn);
		c->hdr->nr_pfns = cpu_to_le64(end - pfn);

		sg_init_table(bm->sg, 1 + nb);
		sg_set_buf(&bm->sg[0], c->hdr, sizeof(*c->hdr));
		for (b = 0; b < nb; b++)
			sg_set_buf(&bm->sg[1 + b], c->bmap[b],
				   min_t(unsigned long, VB_BMAP_BYTES, nbytes - b * VB_BMAP_BYTES));
		for (;;) {
			err = virtqueue_add_outbuf(bm->vq, bm->sg, 1 + nb, c, GFP_KERNEL);
			if (err != -ENOSPC || !bm->busy || !vb_wait_chunk(bm))
				break;
		}
		if (err) {
			dev_warn_ratelimited(&bm->vdev->dev, "bitmap chunk not queued: %d\n", err);
			goto abandon;
		}
		c->busy = true;
		bm->busy++;
		virtqueue_kick(bm->vq);
		chunks++;
		pfn = end;
	} while (!done);

	WRITE_ONCE(last_round_id, id);
	WRITE_ONCE(last_round_chunks, chunks);
	WRITE_ONCE(last_round_free_pages, st.free_pages);
	WRITE_ONCE(last_round_ns, ktime_get_ns() - t0);
	WRITE_ONCE(last_round_max_hold_ns, st.max_hold_ns);
	WRITE_ONCE(last_round_lock_holds, st.holds);
	WRITE_ONCE(last_round_cut_lists, st.cut_lists);
	WRITE_ONCE(rounds_done, rounds_done + 1);
	return;
abandon:
	if (!vb_stopping(bm)) {
		WRITE_ONCE(rounds_abandoned, rounds_abandoned + 1);
		dev_warn_ratelimited(&bm->vdev->dev,
				     "bitmap round %llu given up after %u chunks (%u buffers held by the device)\n",
				     id, chunks, bm->busy);
	}
}

static void vb_work(struct work_struct *work)
{
	struct vb_bitmap *bm = container_of(work, struct vb_bitmap, work);

	for (;;) {
		u64 id;

		vb_reap(bm);
		vb_post_request(bm);
		if (vb_stopping(bm))
			return;
		spin_lock_irq(&bm->lock);
		id = bm->pending_id;
		bm->pending_id = 0;
		spin_unlock_irq(&bm->lock);
		if (!id)
			return;
		vb_round(bm, id);
	}
}

void vb_bitmap_vq_done(struct vb_bitmap *bm)
{
	unsigned long flags;

	wake_up(&bm->used);
	spin_lock_irqsave(&bm->lock, flags);
	if (!bm->stopping)
		queue_work(bm->wq, &bm->work);
	spin_unlock_irqrestore(&bm->lock, flags);
}

/* ---- lifecycle ---- */

static void vb_free_buffers(struct vb_bitmap *bm)
{
	unsigned int i, b;

	for (i = 0; i < VB_NR_CHUNKS; i++) {
		for (b = 0; b < VB_MAX_BMAPS; b++)
			if (bm->chunk[i].bmap[b])
				free_pages((unsigned long)bm->chunk[i].bmap[b],
					   get_order(VB_BMAP_BYTES));
		kfree(bm->chunk[i].hdr);
	}
	kfree(bm->req);
}

struct vb_bitmap *vb_bitmap_create(struct virtio_device *vdev)
{
	unsigned long pfns = vb_max_pfn();
	struct vb_bitmap *bm;
	unsigned int i, b;

	BUILD_BUG_ON(PAGE_SHIFT != VB_PAGE_SHIFT);
	bm = kzalloc(sizeof(*bm), GFP_KERNEL);
	if (!bm)
		return NULL;
	bm->vdev = vdev;
	spin_lock_init(&bm->lock);
	init_waitqueue_head(&bm->used);
	INIT_WORK(&bm->work, vb_work);
	bm->nbmap = clamp_t(unsigned long, DIV_ROUND_UP(pfns, VB_PFNS_PER_BMAP), 1, VB_MAX_BMAPS);
	bm->req = kzalloc(sizeof(*bm->req), GFP_KERNEL);
	if (!bm->req)
		goto fail;
	for (i = 0; i < VB_NR_CHUNKS; i++) {
		bm->chunk[i].hdr = kzalloc(sizeof(*bm->chunk[i].hdr), GFP_KERNEL);
		if (!bm->chunk[i].hdr)
			goto fail;
		for (b = 0; b < bm->nbmap; b++) {
			bm->chunk[i].bmap[b] = (void *)__get_free_pages(GFP_KERNEL | __GFP_NOWARN,
									get_order(VB_BMAP_BYTES));
			if (!bm->chunk[i].bmap[b])
				goto fail;
		}
	}
	bm->wq = alloc_ordered_workqueue("vb-bitmap", WQ_FREEZABLE);
	if (!bm->wq)
		goto fail;
	bm->stopping = true;		/* until start */
	return bm;
fail:
	vb_free_buffers(bm);
	kfree(bm);
	return NULL;
}

int vb_bitmap_start(struct vb_bitmap *bm, struct virtqueue *vq)
{
	bm->vq = vq;
	bm->busy = 0;
	bm->req_posted = false;
	bm->pending_id = 0;
	vb_post_request(bm);
	if (!bm->req_posted)
		return -ENOSPC;
	spin_lock_irq(&bm->lock);
	bm->stopping = false;
	spin_unlock_irq(&bm->lock);
	return 0;
}

void vb_bitmap_stop(struct vb_bitmap *bm)
{
	spin_lock_irq(&bm->lock);
	bm->stopping = true;
	spin_unlock_irq(&bm->lock);
	wake_up(&bm->used);
	cancel_work_sync(&bm->work);
}

void vb_bitmap_detach(struct vb_bitmap *bm)
{
	unsigned int i;

	/* The device is reset: nothing reads or writes our buffers any more. */
	if (bm->vq)
		while (virtqueue_detach_unused_buf(bm->vq))
			;
	for (i = 0; i < VB_NR_CHUNKS; i++)
		bm->chunk[i].busy = false;
	bm->busy = 0;
	bm->req_posted = false;
	bm->vq = NULL;
}

void vb_bitmap_destroy(struct vb_bitmap *bm)
{
	if (!bm)
		return;
	destroy_workqueue(bm->wq);
	vb_free_buffers(bm);
	kfree(bm);
}
