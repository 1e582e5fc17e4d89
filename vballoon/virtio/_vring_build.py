"""cffi (API mode) build of ``vballoon.virtio._vring``: the split-virtqueue chain walk, the memory
barriers the virtqueue needs, the discard loop (one MADV_REMOVE per range, without a
Python call each: scattered pages mean one syscall per page), and the SIGBUS guard of guest
mappings (a truncated guest RAM file must not kill the daemon).  Built by ``pip install -e .`` through ``setup.py``.

Why C: a bitmap-queue chunk is a chain of 33 descriptors, and walking them in Python costs
more than merging the megabyte of bitmap they carry.  The walk is the one place guest
descriptors are read and checked; :mod:`vballoon.virtio.virtqueue` wraps it and turns its error codes
into :class:`~vballoon.errors.GuestError` rules.

Every guest address is checked against the memory table (``rstart``/``rend``, sorted, without
overflow) before it is used; an indirect table is read only through its region's host mapping
(``rhost``) after that check.  Each descriptor is copied out of guest memory once, then
checked: the guest may rewrite the ring meanwhile, and what was checked is what is used.
"""
from cffi import FFI

CDEF = """
#define VQ_ERR_HEAD ...
#define VQ_ERR_LOOP ...
#define VQ_ERR_NEXT ...
#define VQ_ERR_INDIRECT_FEATURE ...
#define VQ_ERR_INDIRECT_NESTED ...
#define VQ_ERR_INDIRECT_NEXT ...
#define VQ_ERR_INDIRECT_LENGTH ...
#define VQ_ERR_INDIRECT_ALONE ...
#define VQ_ERR_READ_AFTER_WRITE ...
#define VQ_ERR_TOO_LONG ...
#define VQ_ERR_OUTSIDE ...

int64_t vq_walk(const uint8_t *table, uint32_t num, uint32_t head, int indirect_ok,
                size_t nreg, const uint64_t *rstart, const uint64_t *rend,
                uint8_t *const *rhost, uint64_t *addr, size_t *len, uint8_t **host,
                uint64_t *info);
int64_t vq_discard(uint8_t *base, const uint64_t *off, const uint64_t *len, size_t n,
                   int *err);
int64_t vq_bits_update(uint8_t *bits, int64_t lo, int64_t hi, const int64_t *pfns, size_t n,
                       int value, int64_t *changed);
void vq_mb(void);
void vq_rmb(void);
void vq_wmb(void);
int vq_guard_install(void);
int vq_guard_add(uint8_t *base, size_t len);
void vq_guard_remove(uint8_t *base);
uint64_t vq_guard_faults(uint8_t *base);
"""

SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define VQ_ERR_HEAD              (-1)   /* head >= queue size */
#define VQ_ERR_LOOP              (-2)   /* more descriptors than the table holds */
#define VQ_ERR_NEXT              (-3)   /* next >= table size */
#define VQ_ERR_INDIRECT_FEATURE  (-4)   /* INDIRECT without VIRTIO_F_INDIRECT_DESC */
#define VQ_ERR_INDIRECT_NESTED   (-5)   /* INDIRECT inside an indirect table */
#define VQ_ERR_INDIRECT_NEXT     (-6)   /* INDIRECT and NEXT both set */
#define VQ_ERR_INDIRECT_LENGTH   (-7)   /* table length 0, not a multiple of 16, or > size */
#define VQ_ERR_INDIRECT_ALONE    (-8)   /* an indirect descriptor after others */
#define VQ_ERR_READ_AFTER_WRITE  (-9)   /* device-readable after device-writable */
#define VQ_ERR_TOO_LONG          (-10)  /* the chain's total length exceeds 2^32 */
#define VQ_ERR_OUTSIDE           (-11)  /* a buffer or table outside guest memory */

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

struct desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };

/* Index of the region holding all of [a, a+n), or -1.  Regions are sorted and disjoint. */
static int64_t find(size_t nreg, const uint64_t *rstart, const uint64_t *rend,
                    uint64_t a, uint64_t n)
{
    size_t lo = 0, hi = nreg;
    while (lo < hi) {                       /* first region starting after a */
        size_t mid = lo + (hi - lo) / 2;
        if (rstart[mid] <= a) lo = mid + 1; else hi = mid;
    }
    if (lo == 0)
        return -1;
    lo--;
    if (a >= rend[lo] || n > rend[lo] - a)  /* no overflow: a < rend */
        return -1;
    return (int64_t)lo;
}

/*
 * Walk the chain at `head` of the descriptor table `table` (`num` entries, little-endian).
 * Writes at most `num` buffers to addr/len, and where each is mapped in this process to host
 * (checked: the whole buffer lies in one region); info[2] is the index of the first
 * device-writable buffer (UINT64_MAX if none).  A chain longer than the queue size is an
 * error (VIRTIO 1.2 §2.7.5.3.1 and the loop bound are the same rule).  Returns the number of
 * buffers, or a VQ_ERR_* code with the offending values in info[0..1].
 */
int64_t vq_walk(const uint8_t *table, uint32_t num, uint32_t head, int indirect_ok,
                size_t nreg, const uint64_t *rstart, const uint64_t *rend,
                uint8_t *const *rhost, uint64_t *addr, size_t *len, uint8_t **host,
                uint64_t *info)
{
    const uint8_t *t = table;
    uint32_t size = num, i = head, seen = 0, count = 0;
    uint64_t total = 0;
    int indirect = 0, wrote = 0;

    info[0] = head; info[1] = num; info[2] = UINT64_MAX;
    if (head >= num)
        return VQ_ERR_HEAD;
    for (;;) {
        struct desc d;
        int64_t r;
        if (++seen > size) {
            info[0] = head; info[1] = size;
            return VQ_ERR_LOOP;
        }
        memcpy(&d, t + (size_t)i * 16, 16);     /* one copy: the guest may rewrite it */
        if (d.flags & F_INDIRECT) {
            info[0] = d.addr; info[1] = d.len;
            if (!indirect_ok) return VQ_ERR_INDIRECT_FEATURE;
            if (indirect) return VQ_ERR_INDIRECT_NESTED;
            if (d.flags & F_NEXT) return VQ_ERR_INDIRECT_NEXT;
            if (seen != 1) return VQ_ERR_INDIRECT_ALONE;
            if (d.len == 0 || d.len % 16 || d.len / 16 > num) return VQ_ERR_INDIRECT_LENGTH;
            r = find(nreg, rstart, rend, d.addr, d.len);
            if (r < 0) return VQ_ERR_OUTSIDE;
            t = rhost[r] + (d.addr - rstart[r]);
            size = d.len / 16; i = 0; seen = 0; indirect = 1;
            continue;
        }
        if (!(d.flags & F_WRITE) && wrote) {
            info[0] = count;
            return VQ_ERR_READ_AFTER_WRITE;
        }
        if ((d.flags & F_WRITE) && !wrote)
            info[2] = count;                    /* the first device-writable buffer */
        wrote |= d.flags & F_WRITE;
        total += d.len;
        if (total > ((uint64_t)1 << 32)) {
            info[0] = head; info[1] = total;
            return VQ_ERR_TOO_LONG;
        }
        r = find(nreg, rstart, rend, d.addr, d.len);
        if (r < 0) {
            info[0] = d.addr; info[1] = d.len;
            return VQ_ERR_OUTSIDE;
        }
        addr[count] = d.addr; len[count] = d.len;
        host[count] = rhost[r] + (d.addr - rstart[r]);
        count++;                                /* <= seen <= size <= num */
        if (!(d.flags & F_NEXT))
            return count;
        if (d.next >= size) {
            info[0] = d.next; info[1] = size;
            return VQ_ERR_NEXT;
        }
        i = d.next;
    }
}

/*
 * MADV_REMOVE each [base + off[i], + len[i]) of one region's mapping: a hole punched in the
 * guest RAM file.  The caller clipped every range to the region.  Returns how many ranges were
 * done; on a failure, *err is its errno and the rest are not attempted.
 */
int64_t vq_discard(uint8_t *base, const uint64_t *off, const uint64_t *len, size_t n, int *err)
{
    *err = 0;
    for (size_t i = 0; i < n; i++)
        if (madvise(base + off[i], len[i], MADV_REMOVE)) {
            *err = errno;
            return (int64_t)i;
        }
    return (int64_t)n;
}

/*
 * SIGBUS guard for guest RAM.  A front-end can truncate the file behind a mapping; the next
 * access to a page past the new end raises SIGBUS, which would kill the daemon.  The handler
 * below, for an address inside a registered guest mapping, maps a private zero page over the
 * faulting page (the access is restarted and succeeds) and counts the fault against that
 * mapping; the session sees the count and drops the connection.  Any other SIGBUS goes to the
 * handler that was there before (Python's faulthandler, or the default: a core dump).
 */
#define VQ_GUARD_MAX 64
static uintptr_t guard_lo[VQ_GUARD_MAX], guard_hi[VQ_GUARD_MAX];
static volatile uint64_t guard_faults[VQ_GUARD_MAX];
static volatile sig_atomic_t guard_n;
static struct sigaction guard_old;
static int guard_installed;

static void guard_handler(int sig, siginfo_t *si, void *ctx)
{
    uintptr_t a = (uintptr_t)si->si_addr, page = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (int i = 0; i < guard_n; i++)
        if (a >= guard_lo[i] && a < guard_hi[i]) {
            void *p = mmap((void *)(a & ~(page - 1)), page, PROT_READ | PROT_WRITE,
                           MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p != MAP_FAILED) {
                guard_faults[i]++;
                return;
            }
            break;
        }
    /* not guest RAM (or no page could be mapped): the previous disposition takes it */
    sigaction(SIGBUS, &guard_old, NULL);
    (void)sig; (void)ctx;
}

int vq_guard_install(void)
{
    struct sigaction sa;
    if (guard_installed)
        return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &guard_old))
        return -errno;
    guard_installed = 1;
    return 0;
}

int vq_guard_add(uint8_t *base, size_t len)
{
    if (guard_n >= VQ_GUARD_MAX)
        return -1;
    guard_lo[guard_n] = (uintptr_t)base;
    guard_hi[guard_n] = (uintptr_t)base + len;
    guard_faults[guard_n] = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    guard_n++;                                /* published after its bounds */
    return 0;
}

void vq_guard_remove(uint8_t *base)
{
    for (int i = 0; i < guard_n; i++)
        if (guard_lo[i] == (uintptr_t)base) {
            int last = guard_n - 1;
            guard_lo[i] = guard_lo[last];
            guard_hi[i] = guard_hi[last];
            guard_faults[i] = guard_faults[last];
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            guard_n--;
            return;
        }
}

uint64_t vq_guard_faults(uint8_t *base)
{
    for (int i = 0; i < guard_n; i++)
        if (guard_lo[i] == (uintptr_t)base)
            return guard_faults[i];
    return 0;
}

/*
 * A set of pfns [lo, hi) kept as a bitmap (bit k = byte k/8 bit k%8 = pfn lo + k, the bitmap
 * holds (hi - lo + 7) / 8 bytes): add (value != 0) or remove each of n pfns; pfns outside
 * [lo, hi) are skipped.  The pfns whose membership changed are written to changed[] in input
 * order (a duplicate changes nothing the second time); returns how many.  One pass, no
 * sorting: the balloon's inflate/deflate bookkeeping without per-page Python.
 */
int64_t vq_bits_update(uint8_t *bits, int64_t lo, int64_t hi, const int64_t *pfns, size_t n,
                       int value, int64_t *changed)
{
    int64_t m = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t p = pfns[i];
        if (p < lo || p >= hi)
            continue;
        uint64_t q = (uint64_t)(p - lo);
        uint8_t mask = (uint8_t)(1u << (q & 7));
        int was = (bits[q >> 3] & mask) != 0;
        if (was == (value != 0))
            continue;
        bits[q >> 3] ^= mask;
        changed[m++] = p;
    }
    return m;
}

/* Memory barriers (Linux: virt_mb / virt_rmb / virt_wmb); Python has none of its own. */
void vq_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void vq_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
void vq_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vballoon.virtio._vring", SOURCE, define_macros=[("_DEFAULT_SOURCE", None)],
                      extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
