/*
 * vbprobe: a static helper in the test guest's initramfs (setup.sh builds it in the
 * trixie tree; tests/qemu/test_guest_driver.py drives it).  Busybox alone is too slow
 * under TCG for these, and cannot read its own page frames.
 *
 *   vbprobe buddy         pfn ranges whose /proc/kpageflags buddy bit (10) is set:
 *                         "start count" lines, then "total N"
 *   vbprobe hold MIB      map MIB of anonymous memory, write every page, print the pfn
 *                         ranges backing it (/proc/self/pagemap), "held N", then wait
 *                         until killed (the pages stay in use meanwhile).  The pages are
 *                         4 KiB (no THP: khugepaged would copy them) and mlocked: with
 *                         vm.compact_unevictable_allowed=0 compaction leaves them where
 *                         they are, so the pfns printed stay theirs
 *   vbprobe frag MIB      like hold, then give back every other page: a fragmented
 *                         guest (order-0 free blocks between held pages); prints "frag N"
 *   vbprobe touch MIB     write MIB of anonymous memory, then exit (a workload that ends)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define KPF_BUDDY 10
#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)

static long page;

static void die(const char *what)
{
	fprintf(stderr, "vbprobe: %s: %s\n", what, strerror(errno));
	exit(2);
}

struct runs {
	uint64_t start, len, total;
};

static void run_add(struct runs *r, uint64_t pfn)
{
	if (r->len && pfn == r->start + r->len) {
		r->len++;
	} else {
		if (r->len)
			printf("%" PRIu64 " %" PRIu64 "\n", r->start, r->len);
		r->start = pfn;
		r->len = 1;
	}
	r->total++;
}

static void run_end(struct runs *r)
{
	if (r->len)
		printf("%" PRIu64 " %" PRIu64 "\n", r->start, r->len);
	r->len = 0;
}

static int buddy(void)
{
	static uint64_t buf[65536];
	struct runs r = {0};
	uint64_t pfn = 0;
	int fd = open("/proc/kpageflags", O_RDONLY);
	ssize_t n;

	if (fd < 0)
		die("/proc/kpageflags");
	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		for (ssize_t i = 0; i < n / 8; i++, pfn++)
			if (buf[i] >> KPF_BUDDY & 1)
				run_add(&r, pfn);
	}
	if (n < 0)
		die("read /proc/kpageflags");
	run_end(&r);
	printf("total %" PRIu64 "\n", r.total);
	return 0;
}

static char *map_and_touch(size_t bytes)
{
	char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		die("mmap");
	if (madvise(p, bytes, MADV_NOHUGEPAGE))
		die("madvise(MADV_NOHUGEPAGE)");
	for (size_t off = 0; off < bytes; off += page)
		p[off] = (char)(off / page | 1);
	return p;
}

/* Print the pfns backing every @step-th page of [p, p + bytes); return how many. */
static uint64_t print_pfns(char *p, size_t bytes, size_t step)
{
	int fd = open("/proc/self/pagemap", O_RDONLY);
	struct runs r = {0};

	if (fd < 0)
		die("/proc/self/pagemap");
	for (size_t i = 0; i < bytes / page; i += step) {
		uint64_t e;

		if (pread(fd, &e, 8, ((uintptr_t)p / page + i) * 8) != 8)
			die("read pagemap");
		if (!(e & PM_PRESENT) || !(e & PM_PFN_MASK)) {
			fprintf(stderr, "vbprobe: page %zu not present (%#" PRIx64 ")\n", i, e);
			exit(3);
		}
		run_add(&r, e & PM_PFN_MASK);
	}
	run_end(&r);
	close(fd);
	return r.total;
}

int main(int argc, char **argv)
{
	size_t bytes;

	page = sysconf(_SC_PAGESIZE);
	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	if (argc == 2 && !strcmp(argv[1], "buddy"))
		return buddy();
	if (argc != 3) {
		fprintf(stderr, "usage: vbprobe buddy | hold MIB | frag MIB | touch MIB\n");
		return 1;
	}
	bytes = strtoull(argv[2], NULL, 0) << 20;
	if (!strcmp(argv[1], "touch")) {
		map_and_touch(bytes);
		return 0;
	}
	if (!strcmp(argv[1], "hold")) {
		char *p = map_and_touch(bytes);

		if (mlock(p, bytes))
			die("mlock");
		printf("held %" PRIu64 "\n", print_pfns(p, bytes, 1));
	} else if (!strcmp(argv[1], "frag")) {
		char *p = map_and_touch(bytes);

		for (size_t off = page; off < bytes; off += 2 * page)
			if (madvise(p + off, page, MADV_DONTNEED))
				die("madvise");
		if (mlock2(p, bytes, MLOCK_ONFAULT))	/* the held half, without refaulting the rest */
			die("mlock2");
		printf("frag %" PRIu64 "\n", print_pfns(p, bytes, 2));
	} else {
		fprintf(stderr, "vbprobe: unknown command %s\n", argv[1]);
		return 1;
	}
	fflush(stdout);
	for (;;)
		pause();
}
