/* vbgen: the migration test's guest workload.  No libc (static, -nostdlib), so the test can
 * copy it into the busybox guest over the serial console.
 *
 *   vbgen MIB STOPFILE [once | RATE]
 *
 * With "once" it writes one generation and exits: a workload that filled memory with non-zero
 * data and went away (the free pages a map is for; freed zero pages would be skipped anyway).
 * With RATE (MiB/s) it writes at most that fast (a sleep after each MiB).
 * Maps MIB MiB and rewrites it forever, one page after the other, generation after generation:
 * every 8-byte word w of page i in generation g holds pattern(g, i, w).  Every 256 pages it
 * looks for STOPFILE; once it exists it checks every page and prints
 *   vbgen: gen G pages N errors E
 * A page is right if all its words hold the pattern of one generation, and the generations run
 * G, ..., G (pages already rewritten) then G-1, ..., G-1: a page copied from an old pass, a lost
 * write or a torn page shows up as an error. */
typedef unsigned long u64;

static long sys(long n, long a, long b, long c, long d, long e, long f) {
    long r;
    register long r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return r;
}

static u64 pattern(u64 g, u64 i, u64 w) {
    if (w == 0) return g << 32 | i;
    u64 x = (g * 0x9E3779B97F4A7C15ul) ^ (i << 20) ^ w;
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ul; x ^= x >> 29;
    return x;
}

static void out(const char *s) { long n = 0; while (s[n]) n++; sys(1, 1, (long)s, n, 0, 0, 0); }
static void num(u64 v) {
    char b[24]; int k = 23; b[k] = 0;
    do { b[--k] = '0' + v % 10; v /= 10; } while (v);
    out(b + k);
}
static u64 atou(const char *s) { u64 v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + *s++ - '0'; return v; }

static void run(long argc, char **argv) {
    if (argc < 3) { out("usage: vbgen MIB STOPFILE\n"); sys(60, 2, 0, 0, 0, 0, 0); }
    u64 pages = atou(argv[1]) << 8;
    /* mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_POPULATE, -1, 0) */
    u64 *m = (u64 *)sys(9, 0, pages << 12, 3, 0x22 | 0x8000, -1, 0);
    if ((long)m < 0) { out("vbgen: mmap failed\n"); sys(60, 1, 0, 0, 0, 0, 0); }
    u64 g = 1, i = 0, rate = 0;
    int once = argc > 3 && argv[3][0] == 'o';
    if (argc > 3 && !once) rate = atou(argv[3]);
    struct { long s, ns; } nap = { 0, rate ? 1000000000l / (long)rate : 0 };
    if (nap.ns >= 1000000000l) { nap.s = nap.ns / 1000000000l; nap.ns %= 1000000000l; }
    for (;;) {
        u64 *p = m + (i << 9);
        for (u64 w = 0; w < 512; w++) p[w] = pattern(g, i, w);
        if (++i == pages) { i = 0; g++; if (once) sys(60, 0, 0, 0, 0, 0, 0); }
        if ((i & 255) == 0) {
            if (sys(21, (long)argv[2], 0, 0, 0, 0, 0) == 0) break;  /* access() */
            if (rate) sys(35, (long)&nap, 0, 0, 0, 0, 0);            /* nanosleep() */
        }
    }
    /* pages [0, i) hold generation g, pages [i, pages) generation g - 1 */
    u64 errors = 0;
    for (u64 k = 0; k < pages; k++) {
        u64 want = k < i ? g : g - 1, *p = m + (k << 9);
        for (u64 w = 0; w < 512; w++)
            if (p[w] != pattern(want, k, w)) { errors++; break; }
    }
    out("vbgen: gen "); num(g); out(" pages "); num(pages); out(" errors "); num(errors); out("\n");
    sys(60, errors != 0, 0, 0, 0, 0, 0);
}

__asm__(".global _start\n_start:\n mov (%rsp), %rdi\n lea 8(%rsp), %rsi\n and $-16, %rsp\n call start_c\n hlt\n");
void start_c(long argc, char **argv) { run(argc, argv); }
