"""cffi (API mode) build of ``vballoon._fastbits``: the free-page map's bit kernels.

Built by ``pip install -e .`` through ``setup.py`` (``cffi_modules``).  Callers are
:mod:`vballoon.fpmap`; nothing else should need these.

Bit order everywhere: bit *k* of a map is bit ``k % 64`` of little-endian 64-bit word ``k / 64``,
which on a little-endian host (the only kind vballoon runs on, see :mod:`vballoon.wire`) is also
bit ``k % 8`` of byte ``k / 8`` — the bitmap queue's wire order (protocol/bitmap-queue.md).

Every function is bounds-safe on its own: it is given the size of every buffer it touches,
checks its bit ranges against them (overflow-free), and returns -1 without touching anything if
they do not fit.  :func:`fb_runs` writes at most ``cap`` pairs and says where to resume.
"""
from cffi import FFI

CDEF = """
int fb_or(uint64_t *map, size_t nwords, const uint8_t *const *srcs, const size_t *lens,
          size_t n, uint64_t bit, uint64_t nbits);
int fb_fill(uint64_t *map, size_t nwords, uint64_t lo, uint64_t hi, int value);
int64_t fb_popcount(const uint64_t *map, size_t nwords, uint64_t lo, uint64_t hi);
int64_t fb_runs(const uint64_t *map, size_t nwords, uint64_t lo, uint64_t hi,
                uint64_t *out, size_t cap, uint64_t *next);
int64_t fb_count_runs(const uint64_t *map, size_t nwords, uint64_t lo, uint64_t hi);
int64_t fb_fill_runs(uint64_t *map, size_t nwords, const int64_t *runs, size_t n, int64_t base);
"""

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define ONES (~(uint64_t)0)

/* The scanning loops are worth AVX2 + POPCNT where the CPU has them: one clone for x86-64-v3,
   one for the baseline, picked once at load time (ifunc).  Elsewhere: the plain build. */
#if defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__) && __GNUC__ >= 11
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT
#endif

/* bits [0, n) of a word, 0 <= n <= 64 */
static inline uint64_t below(unsigned n) { return n >= 64 ? ONES : (((uint64_t)1 << n) - 1); }

static inline uint64_t popcount64(uint64_t x) { return (uint64_t)__builtin_popcountll(x); }

/* [lo, hi) is a bit window of a map of nwords words */
static int window_ok(size_t nwords, uint64_t lo, uint64_t hi)
{
    return nwords <= (UINT64_MAX >> 6) && lo <= hi && hi <= (uint64_t)nwords * 64;
}

/*
 * A non-empty window [lo, hi) is words first..last.  Bits outside the window are masked off
 * the first and last word; the masks never clear bit 63 of a word before the last, so an
 * interior word's predecessor is read unmasked.
 */
struct window {
    size_t first, last;
    uint64_t head, tail;    /* masks of the first and last word */
};

static inline struct window window_of(uint64_t lo, uint64_t hi)
{
    struct window v;
    v.first = (size_t)(lo / 64);
    v.last = (size_t)((hi - 1) / 64);
    v.head = ONES << (lo & 63);
    v.tail = below((unsigned)(hi - (uint64_t)v.last * 64));
    if (v.first == v.last)
        v.head = v.tail = v.head & v.tail;
    return v;
}

/* The window's word i, masked; i in first..last. */
static inline uint64_t word_at(const uint64_t *w, const struct window *v, size_t i)
{
    return w[i] & (i == v->first ? v->head : ONES) & (i == v->last ? v->tail : ONES);
}

/* Bit j of the result is set where bits j and j-1 of x differ (carry: bit -1). */
static inline uint64_t edges(uint64_t x, uint64_t carry) { return x ^ ((x << 1) | carry); }

static void fill(uint64_t *w, uint64_t lo, uint64_t hi, int value)
{
    if (lo >= hi)
        return;
    struct window v = window_of(lo, hi);
    if (v.first == v.last) {
        w[v.first] = value ? (w[v.first] | v.head) : (w[v.first] & ~v.head);
        return;
    }
    w[v.first] = value ? (w[v.first] | v.head) : (w[v.first] & ~v.head);
    if (v.last > v.first + 1)
        memset(w + v.first + 1, value ? 0xff : 0, (v.last - v.first - 1) * sizeof(uint64_t));
    w[v.last] = value ? (w[v.last] | v.tail) : (w[v.last] & ~v.tail);
}

/* map bits [bit, bit + nbits) |= the first nbits bits of src; the caller checked the bounds. */
static inline void or_span(uint64_t *map, uint64_t bit, const uint8_t *src, uint64_t nbits)
{
    uint8_t *d = (uint8_t *)map + bit / 8;
    size_t nb = (size_t)(nbits / 8);
    unsigned rem = (unsigned)(nbits % 8), s = (unsigned)(bit % 8);
    if (s == 0) {
        for (size_t i = 0; i < nb; i++)     /* vectorized, with a run-time alias check */
            d[i] |= src[i];
        if (rem)
            d[nb] |= src[nb] & (uint8_t)((1u << rem) - 1);
        return;
    }
    /* Unaligned: source byte i covers map bits bit+8i .. bit+8i+7, across two map bytes.  The
       second byte is written only when a source bit lands in it, so never past the window. */
    for (size_t i = 0; i < nb + (rem != 0); i++) {
        unsigned v = src[i];
        if (i == nb)
            v &= (1u << rem) - 1;
        d[i] |= (uint8_t)(v << s);
        if (v >> (8 - s))
            d[i + 1] |= (uint8_t)(v >> (8 - s));
    }
}

/*
 * OR a bitmap into map at bit `bit`: map[bit + k] |= bit k of the bitmap, for k < nbits.  The
 * bitmap is the concatenation of n byte spans (srcs[i], lens[i]) — a descriptor chain's
 * buffers — and its bits at or past nbits are ignored.  -1, with nothing written, if
 * [bit, bit + nbits) leaves the map or the spans hold fewer than ceil(nbits / 8) bytes.
 */
HOT int fb_or(uint64_t *map, size_t nwords, const uint8_t *const *srcs, const size_t *lens,
              size_t n, uint64_t bit, uint64_t nbits)
{
    if (nwords > (UINT64_MAX >> 6) || bit > (uint64_t)nwords * 64
        || nbits > (uint64_t)nwords * 64 - bit)
        return -1;
    uint64_t need = nbits / 8 + (nbits % 8 != 0), have = 0;
    for (size_t i = 0; i < n && have < need; i++)
        have += lens[i] < need - have ? lens[i] : need - have;
    if (have < need)
        return -1;
    for (size_t i = 0; i < n && nbits; i++) {
        need = nbits / 8 + (nbits % 8 != 0);        /* bytes still to read */
        uint64_t k = (uint64_t)lens[i] >= need ? nbits : (uint64_t)lens[i] * 8;
        or_span(map, bit, srcs[i], k);
        bit += k;
        nbits -= k;
    }
    return 0;
}

/* Set (value != 0) or clear bits [lo, hi).  -1 if the window leaves the map. */
int fb_fill(uint64_t *map, size_t nwords, uint64_t lo, uint64_t hi, int value)
{
    if (!window_ok(nwords, lo, hi))
        return -1;
    fill(map, lo, hi, value);
    return 0;
}

/* Set bits in [lo, hi), or -1. */
HOT int64_t fb_popcount(const uint64_t *map, size_t nwords, uint64_t lo, uint64_t hi)
{
    if (!window_ok(nwords, lo, hi))
        return -1;
    if (lo == hi)
        return 0;
    struct window v = window_of(lo, hi);
    uint64_t n = popcount64(word_at(map, &v, v.first));
    for (size_t i = v.first + 1; i < v.last; i++)
        n += popcount64(map[i]);
    if (v.last != v.first)
        n += popcount64(map[v.last] & v.tail);
    return (int64_t)n;
}

/* Append the positions of the edges in t (word base) to out: starts and ends alternate, so
   a start is due when *m is even.  Stops before a start once out holds cap2 positions. */
static inline int put_edges(uint64_t t, uint64_t base, uint64_t *out, uint64_t *m,
                            uint64_t cap2, uint64_t *next)
{
    for (; t; t &= t - 1) {
        uint64_t pos = base + (uint64_t)__builtin_ctzll(t);
        if (*m == cap2) {           /* cap2 is even: this is a start that does not fit */
            *next = pos;
            return 1;
        }
        out[(*m)++] = pos;
    }
    return 0;
}

/*
 * The maximal runs of set bits inside [lo, hi), in order, as (start, length) pairs into
 * out[0 .. 2*cap).  Returns the number of pairs written, or -1.  *next is where a further call
 * should resume: hi when every run was written, else the start of the first run that did not
 * fit (runs are never split by the capacity).
 *
 * Edges (bits that differ from their predecessor) are the runs' starts and ends, alternating.
 * Most words have none, so each group of 64 words is first reduced, without branches, to a
 * mask of the words that do, and only those are looked at.
 */
HOT int64_t fb_runs(const uint64_t *map, size_t nwords, uint64_t lo, uint64_t hi,
                    uint64_t *out, size_t cap, uint64_t *next)
{
    if (!window_ok(nwords, lo, hi) || next == NULL || (cap && out == NULL)
        || cap > UINT64_MAX / 2)
        return -1;
    *next = hi;
    if (lo == hi)
        return 0;
    struct window v = window_of(lo, hi);
    uint64_t m = 0, cap2 = 2 * (uint64_t)cap;
    if (put_edges(edges(word_at(map, &v, v.first), 0), (uint64_t)v.first * 64, out, &m, cap2,
                  next))
        goto full;
    for (size_t b = v.first + 1; b < v.last; b += 64) {
        size_t e = b + 64 < v.last ? b + 64 : v.last;
        uint64_t f = 0;
        for (size_t i = b; i < e; i++)
            f |= (uint64_t)(edges(map[i], map[i - 1] >> 63) != 0) << (i - b);
        for (; f; f &= f - 1) {
            size_t i = b + (size_t)__builtin_ctzll(f);
            if (put_edges(edges(map[i], map[i - 1] >> 63), (uint64_t)i * 64, out, &m, cap2,
                          next))
                goto full;
        }
    }
    if (v.last != v.first
        && put_edges(edges(map[v.last] & v.tail, map[v.last - 1] >> 63),
                     (uint64_t)v.last * 64, out, &m, cap2, next))
        goto full;
    if (m % 2)                      /* a run reaches the window's end */
        out[m++] = hi;
full:                               /* m is even here: every start written has its end */
    for (uint64_t j = 0; j < m; j += 2)
        out[j + 1] -= out[j];
    return (int64_t)(m / 2);
}

/* The number of maximal runs of set bits inside [lo, hi) (a run cut by lo counts), or -1:
   the starts of runs, counted without writing any. */
HOT int64_t fb_count_runs(const uint64_t *map, size_t nwords, uint64_t lo, uint64_t hi)
{
    if (!window_ok(nwords, lo, hi))
        return -1;
    if (lo == hi)
        return 0;
    struct window v = window_of(lo, hi);
    uint64_t x = word_at(map, &v, v.first), prev = x, n = popcount64(x & ~(x << 1));
    for (size_t i = v.first + 1; i <= v.last; i++) {
        x = i == v.last ? map[i] & v.tail : map[i];
        n += popcount64(x & ~((x << 1) | (prev >> 63)));
        prev = x;
    }
    return (int64_t)n;
}

/*
 * Set the bits of n (start, length) runs (int64 pairs, global bit numbers), each shifted by
 * -base and clipped to the map: what a compacted map's runs expand back into.  Returns the
 * number of bits set (runs are disjoint), never touching anything outside the map.
 */
int64_t fb_fill_runs(uint64_t *map, size_t nwords, const int64_t *runs, size_t n, int64_t base)
{
    if (nwords > (UINT64_MAX >> 7))
        return -1;
    int64_t size = (int64_t)nwords * 64, total = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t lo = runs[2 * i] - base, len = runs[2 * i + 1];
        if (len <= 0 || lo >= size || lo + len <= 0)
            continue;
        int64_t hi = lo + len > size ? size : lo + len;
        if (lo < 0)
            lo = 0;
        fill(map, (uint64_t)lo, (uint64_t)hi, 1);
        total += hi - lo;
    }
    return total;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vballoon.fpmap._fastbits", SOURCE,
                      extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wextra"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
