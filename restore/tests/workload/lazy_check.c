/* A process to be dumped and restored lazily, which checks its own memory afterwards.
 *
 * usage: lazy_check DIR MIB [THREADS]
 *
 * With THREADS, that many more threads wait for DIR/go too and check the whole region
 * alongside the main thread, in mode check.
 * Fills a region of MIB MiB with a pattern derived from each word's offset, writes
 * "PID ADDR LEN STACK" to DIR/ready (STACK: an address on the main thread's stack), then polls for DIR/go (every 2 ms, touching nothing in
 * the region) and runs the mode named in it:
 *   check  every word of the region
 *   fork   fork while pages are missing; parent and child check everything
 *   mm     munmap, mremap and MADV_DONTNEED missing ranges, then check the rest
 *   read   read() from a pipe into a missing page (a fault in kernel mode), then check
 *   slow   check one page per millisecond (the daemon is killed meanwhile)
 *   forkslow  fork, then both processes check as slow does
 * Writes "ok" or what differed to DIR/result and exits 0 or 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL

static char dir[512];
static long failures;
static char first_failure[256];

static uint64_t pattern(uint64_t off) { return (off + 8) * 0x9E3779B97F4A7C15ULL ^ 0x5A5A5A5A5A5A5A5AULL; }

static uint64_t region_base, region_len;
static pthread_t main_thread;
static int poked;

static void path_of(char *out, size_t n, const char *name) { snprintf(out, n, "%s/%s", dir, name); }

/* The inode of our PID namespace: two copies restored at once, each in a namespace of its
 * own, have the same pid and thread ids, and must not share a temporary file. */
static unsigned long pid_ns(void)
{
	char link[64];
	ssize_t n = readlink("/proc/self/ns/pid", link, sizeof link - 1);
	if (n <= 0)
		return 0;
	link[n] = 0;
	char *open_bracket = strchr(link, '[');
	return open_bracket ? strtoul(open_bracket + 1, NULL, 10) : 0;
}

static void write_file(const char *name, const char *text)
{
	char path[600], tmp[700];
	path_of(path, sizeof path, name);
	snprintf(tmp, sizeof tmp, "%s.%lu.%ld.tmp", path, pid_ns(), (long)syscall(SYS_gettid));
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		_exit(3);
	if (write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		_exit(3);
	close(fd);
	if (rename(tmp, path))
		_exit(3);
}

/* Checks [live, live + len), whose contents are the region's from offset `off`. */
static void expect(uint64_t live, uint64_t off, uint64_t len, const char *what, int slow)
{
	for (uint64_t o = 0; o < len; o += 8) {
		uint64_t got = *(volatile uint64_t *)(live + o);
		if (got != pattern(off + o) && __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED) == 0)
			snprintf(first_failure, sizeof first_failure, "%s: at %#lx got %#lx want %#lx", what,
				 (unsigned long)(live + o), (unsigned long)got, (unsigned long)pattern(off + o));
		if (slow && o % PG == 0) {
			struct timespec ts = {0, 1000000};
			nanosleep(&ts, NULL);
		}
	}
}

static void expect_zero(uint64_t live, uint64_t len, const char *what)
{
	for (uint64_t o = 0; o < len; o += 8) {
		uint64_t got = *(volatile uint64_t *)(live + o);
		if (got != 0 && failures++ == 0)
			snprintf(first_failure, sizeof first_failure, "%s: at %#lx got %#lx want 0", what,
				 (unsigned long)(live + o), (unsigned long)got);
	}
}

static int finish(const char *name)
{
	char text[400];
	if (failures)
		snprintf(text, sizeof text, "%ld words differed; first: %s\n", failures, first_failure);
	else
		snprintf(text, sizeof text, "ok\n");
	write_file(name, text);
	return failures ? 1 : 0;
}

static void wait_go(char *mode, size_t size)
{
	char go[600], poke[600];
	path_of(go, sizeof go, "go");
	path_of(poke, sizeof poke, "poke");
	for (;;) {
		/* Asked once (by the main thread) to write the region's first quarter again,
		 * same values: those pages become dirty since a pre-dump. */
		if (pthread_self() == main_thread && !poked && access(poke, F_OK) == 0) {
			for (uint64_t o = 0; o < region_len / 4; o += 8)
				*(volatile uint64_t *)(region_base + o) = pattern(o);
			poked = 1;
			write_file("poked", "1\n");
		}
		int fd = open(go, O_RDONLY);
		if (fd >= 0) {
			ssize_t n = read(fd, mode, size - 1);
			close(fd);
			if (n > 0) {
				mode[n] = 0;
				mode[strcspn(mode, "\n")] = 0;
				return;
			}
		}
		struct timespec ts = {0, 2000000};
		nanosleep(&ts, NULL);
	}
}

/* Another thread: in mode check, checks the region from its far end. */
static void *thread_main(void *arg)
{
	(void)arg;
	char mode[32];
	wait_go(mode, sizeof mode);
	if (!strcmp(mode, "check"))
		for (uint64_t o = region_len; o > 0; o -= PG)
			expect(region_base + o - PG, o - PG, PG, "thread", 0);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: lazy_check DIR MIB [THREADS]\n");
		return 2;
	}
	snprintf(dir, sizeof dir, "%s", argv[1]);
	/* Whatever the test runner left open (jobserver pipes) is not ours to dump. */
	syscall(SYS_close_range, 3, ~0U, 0);
	uint64_t len = strtoull(argv[2], NULL, 10) << 20;
	char *r = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (r == MAP_FAILED)
		return 2;
	madvise(r, len, MADV_NOHUGEPAGE);
	uint64_t base = (uint64_t)r;
	for (uint64_t o = 0; o < len; o += 8)
		*(uint64_t *)(base + o) = pattern(o);

	main_thread = pthread_self();
	region_base = base;
	region_len = len;
	int nthreads = argc == 4 ? atoi(argv[3]) : 0;
	pthread_t threads[16];
	if (nthreads < 0 || nthreads > 16)
		return 2;
	for (int i = 0; i < nthreads; i++)
		if (pthread_create(&threads[i], NULL, thread_main, NULL))
			return 2;

	char text[128];
	snprintf(text, sizeof text, "%d %lu %lu %lu\n", getpid(), (unsigned long)base, (unsigned long)len,
		 (unsigned long)text);
	write_file("ready", text);

	char mode[32] = "";
	wait_go(mode, sizeof mode);

	if (!strcmp(mode, "check")) {
		expect(base, 0, len, "region", 0);
		for (int i = 0; i < nthreads; i++)
			pthread_join(threads[i], NULL);
	} else if (!strcmp(mode, "slow")) {
		expect(base, 0, len, "region", 1);
	} else if (!strcmp(mode, "forkslow")) {
		/* Both processes hold missing pages when the daemon is killed. */
		pid_t child = fork();
		if (child < 0)
			return 2;
		if (child == 0) {
			expect(base, 0, len, "child", 1);
			_exit(finish("result.child"));
		}
		snprintf(text, sizeof text, "%d\n", child);
		write_file("child.pid", text);
		expect(base, 0, len, "parent", 1);
		waitpid(child, NULL, 0);
	} else if (!strcmp(mode, "fork")) {
		expect(base, 0, 4 * PG, "before fork", 0);
		pid_t child = fork();
		if (child < 0)
			return 2;
		if (child == 0) {
			/* From the far end, while the parent reads from the start. */
			for (uint64_t o = len; o > 0; o -= PG)
				expect(base + o - PG, o - PG, PG, "child", 0);
			_exit(finish("result.child"));
		}
		expect(base, 0, len, "parent", 0);
		int status;
		if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status)) {
			if (failures++ == 0)
				snprintf(first_failure, sizeof first_failure, "child status %#x", status);
		}
	} else if (!strcmp(mode, "mm")) {
		/* Quarter 1 unmapped, quarter 2 moved elsewhere, first half of quarter 3
		 * dropped, all while missing. */
		uint64_t q = len / 4;
		if (munmap((void *)(base + q), q))
			return 2;
		char *moved = mremap((void *)(base + 2 * q), q, q, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)(base + q));
		if (moved != (void *)(base + q))
			return 2;
		if (madvise((void *)(base + 3 * q), q / 2, MADV_DONTNEED))
			return 2;
		expect(base, 0, q, "quarter 0", 0);
		expect(base + q, 2 * q, q, "quarter 2 moved down", 0);
		expect_zero(base + 3 * q, q / 2, "quarter 3 dropped half");
		expect(base + 3 * q + q / 2, 3 * q + q / 2, q / 2, "quarter 3 kept half", 0);
	} else if (!strcmp(mode, "read")) {
		int p[2];
		if (pipe(p))
			return 2;
		char msg[PG];
		for (unsigned i = 0; i < sizeof msg; i++)
			msg[i] = (char)(i * 7 + 1);
		if (write(p[1], msg, sizeof msg) != sizeof msg)
			return 2;
		/* A whole missing page in the middle of the region, filled by the kernel. */
		uint64_t at = base + (len / 2 & ~(PG - 1));
		if (read(p[0], (void *)at, sizeof msg) != sizeof msg)
			return 2;
		if (memcmp((void *)at, msg, sizeof msg) && failures++ == 0)
			snprintf(first_failure, sizeof first_failure, "read() into a lazy page: wrong data");
		expect(base, 0, at - base, "before the read page", 0);
		expect(at + PG, at + PG - base, base + len - at - PG, "after the read page", 0);
	} else {
		write_file("result", "unknown mode\n");
		return 2;
	}
	return finish("result");
}
