/* The process of the lazy restore benchmark.
 *
 * usage: lazy_bench_workload DIR MIB
 *
 * Fills MIB MiB with a pattern, writes "PID" to DIR/ready and polls for DIR/go every
 * 50 us. Once restored and running, it writes its CLOCK_REALTIME (ns) to DIR/answer at
 * once (its first answer), then, by the word in DIR/go:
 *   idle   waits for DIR/quit (the daemon pushes every page meanwhile)
 *   fault  touches 2000 pages spread over the region, timing each access, and writes
 *          "median_ns p99_ns max_ns" to DIR/faults
 * and exits 0 if every touched word held the pattern. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL
#define SAMPLES 2000

static char dir[512];

static uint64_t pattern(uint64_t off) { return (off + 8) * 0x9E3779B97F4A7C15ULL; }

static uint64_t now_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void write_file(const char *name, const char *text)
{
	char path[600], tmp[640];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		_exit(3);
	close(fd);
	if (rename(tmp, path))
		_exit(3);
}

static int exists(const char *name)
{
	char path[600];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	return access(path, F_OK) == 0;
}

static int cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	snprintf(dir, sizeof dir, "%s", argv[1]);
	syscall(SYS_close_range, 3, ~0U, 0);
	uint64_t len = strtoull(argv[2], NULL, 10) << 20;
	char *r = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (r == MAP_FAILED)
		return 2;
	uint64_t base = (uint64_t)r;
	for (uint64_t o = 0; o < len; o += 8)
		*(uint64_t *)(base + o) = pattern(o);
	char text[128];
	snprintf(text, sizeof text, "%d %lu %lu\n", getpid(), (unsigned long)base, (unsigned long)len);
	write_file("ready", text);

	char go[600];
	snprintf(go, sizeof go, "%s/go", dir);
	char mode[16] = "";
	for (;;) {
		int fd = open(go, O_RDONLY);
		if (fd >= 0) {
			ssize_t n = read(fd, mode, sizeof mode - 1);
			close(fd);
			if (n > 0) {
				mode[n] = 0;
				mode[strcspn(mode, "\n")] = 0;
				break;
			}
		}
		struct timespec ts = {0, 50000};
		nanosleep(&ts, NULL);
	}
	snprintf(text, sizeof text, "%lu\n", (unsigned long)now_ns(CLOCK_REALTIME));
	write_file("answer", text);

	long bad = 0;
	if (!strcmp(mode, "fault")) {
		static uint64_t t[SAMPLES];
		uint64_t stride = (len / SAMPLES) & ~(PG - 1);
		for (int i = 0; i < SAMPLES; i++) {
			uint64_t off = (uint64_t)i * stride + PG / 2;
			uint64_t a = now_ns(CLOCK_MONOTONIC);
			uint64_t got = *(volatile uint64_t *)(base + off);
			t[i] = now_ns(CLOCK_MONOTONIC) - a;
			bad += got != pattern(off);
		}
		qsort(t, SAMPLES, sizeof t[0], cmp);
		snprintf(text, sizeof text, "%lu %lu %lu\n", (unsigned long)t[SAMPLES / 2],
			 (unsigned long)t[SAMPLES * 99 / 100], (unsigned long)t[SAMPLES - 1]);
		write_file("faults", text);
	} else {
		while (!exists("quit")) {
			struct timespec ts = {0, 1000000};
			nanosleep(&ts, NULL);
		}
		for (uint64_t o = 0; o < len; o += PG)
			bad += *(volatile uint64_t *)(base + o) != pattern(o);
	}
	return bad ? 1 : 0;
}
