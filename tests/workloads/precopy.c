/* Memory that keeps changing between pre-copy rounds. A writer thread stamps random pages of a
 * region (--mib N, default 64; --batch B pages per millisecond, default 64; --fence 1 see below) with a sequence number (every word of the page) and then records the number in a
 * journal; now and then it drops a page with MADV_DONTNEED instead (journal 0: the page must read
 * as zeroes). A mapper thread keeps mapping, filling and unmapping small regions. SIGUSR1 stops
 * both threads; once they have stopped, the workload writes the file "quiet" next to the ready
 * file, so the final dump sees memory that no longer changes. After the restore every page must
 * match its journal entry: a dirty page that a pre-copy round lost shows up as a mismatch.
 * With --gated 1 the writer stops after its first 1000 writes and then writes one batch per
 * SIGWINCH, with no timer, writing the number of batches done to the file "ticks" after each:
 * a test then knows how many pages were written between two rounds however loaded the machine
 * is. (The mapper keeps its timer: at most MAX_MAPS small regions exist at any time.) */
#include "workload.h"

#include <pthread.h>
#include <sys/mman.h>

#define WORDS (4096 / 8)
#define MAX_MAPS 64

static size_t npages;
static uint64_t batch;
static uint64_t *region;
static uint64_t *journal;
static volatile long current = -1; /* the page the writer is in the middle of, or -1 */
static volatile int quiet;
static volatile uint64_t writes;
static int gated;
static volatile uint64_t granted; /* batches asked for by SIGWINCH (--gated 1) */
static char ticks_path[4200];

struct small_map {
	uint64_t *addr;
	size_t words;
	uint64_t stamp;
};
static struct small_map maps[MAX_MAPS];
static int nmaps;

/* With --fence 1, anonymous memory between two PROT_NONE pages: the mapper's small regions,
 * mapped and unmapped next to it all the time, then cannot merge into it and change its bounds
 * (a changed VMA is dumped whole by the next round). Without, they can: both must be correct. */
static int fence;

static void *fenced(size_t len)
{
	size_t pad = fence ? 4096 : 0;
	char *p = mmap(NULL, len + 2 * pad, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		wl_die("mmap");
	if (fence && (mprotect(p, pad, PROT_NONE) || mprotect(p + pad + len, pad, PROT_NONE)))
		wl_die("mprotect");
	return p + pad;
}

static void on_usr1(int sig)
{
	(void)sig;
	quiet = 1;
}

static void on_winch(int sig)
{
	(void)sig;
	__atomic_fetch_add(&granted, 1, __ATOMIC_RELAXED);
}

/* At a batch boundary past the first 1000 writes: reports the batches done, then waits until
 * one more is granted (or the writers are told to stop). */
static void gate(void)
{
	if (writes < 1000 || (writes - 1000) % batch != 0)
		return;
	uint64_t done = (writes - 1000) / batch;
	char text[32];
	snprintf(text, sizeof text, "%llu\n", (unsigned long long)done);
	wl_write_atomic(ticks_path, text);
	while (!quiet && __atomic_load_n(&granted, __ATOMIC_RELAXED) <= done) {
		struct timespec ts = { 0, 500 * 1000 };
		nanosleep(&ts, NULL);
	}
}

static void *writer(void *arg)
{
	(void)arg;
	uint64_t x = 88172645463325252ULL, seq = 1;
	while (!quiet) {
		if (gated) {
			gate();
			if (quiet)
				break;
		}
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		long p = (long)(x % npages);
		current = p;
		__asm__ volatile("" ::: "memory");
		if (x % 64 == 0) {
			madvise(region + (size_t)p * WORDS, 4096, MADV_DONTNEED);
			journal[p] = 0;
		} else {
			for (size_t i = 0; i < WORDS; i++)
				region[(size_t)p * WORDS + i] = seq;
			journal[p] = seq++;
		}
		__asm__ volatile("" ::: "memory");
		current = -1;
		if (++writes % batch == 0 && !gated) {
			struct timespec ts = { 0, 1000 * 1000 };
			nanosleep(&ts, NULL);
		}
	}
	return NULL;
}

static void *mapper(void *arg)
{
	(void)arg;
	for (uint64_t round = 1; !quiet; round++) {
		if (nmaps == MAX_MAPS) {
			munmap(maps[0].addr, maps[0].words * 8);
			memmove(&maps[0], &maps[1], sizeof maps[0] * (MAX_MAPS - 1));
			nmaps--;
		}
		size_t words = (1 + round % 8) * WORDS;
		uint64_t *m = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (m == MAP_FAILED)
			break;
		for (size_t i = 0; i < words; i++)
			m[i] = round * 1000003 + i;
		maps[nmaps++] = (struct small_map){ m, words, round };
		struct timespec ts = { 0, 5 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	npages = (size_t)wl_opt_long("--mib", 64) * 256;
	batch = (uint64_t)wl_opt_long("--batch", 64);
	fence = wl_opt_long("--fence", 0) != 0;
	gated = wl_opt_long("--gated", 0) != 0;
	if (npages == 0 || batch == 0)
		wl_die("--mib and --batch must be positive");
	region = fenced(npages * 4096);
	journal = fenced((npages * 8 + 4095) & ~4095UL);
	/* every page starts stamped, so that a full dump carries the whole region */
	uint64_t x0 = 0;
	for (size_t p = 0; p < npages; p++) {
		x0++;
		for (size_t i = 0; i < WORDS; i++)
			region[p * WORDS + i] = 0x8000000000000000ULL | x0;
		journal[p] = 0x8000000000000000ULL | x0;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_winch;
	sigaction(SIGWINCH, &sa, NULL);
	char dir[4096], path[4200];
	wl_dir(dir, sizeof dir);
	snprintf(ticks_path, sizeof ticks_path, "%s/ticks", dir);
	pthread_t w, m;
	if (pthread_create(&w, NULL, writer, NULL) || pthread_create(&m, NULL, mapper, NULL))
		wl_die("pthread_create");
	while (writes < 1000)
		usleep(1000);
	wl_ready();
	while (!quiet && !wl_got_usr2)
		usleep(1000);
	pthread_join(w, NULL);
	pthread_join(m, NULL);
	snprintf(path, sizeof path, "%s/quiet", dir);
	wl_write_atomic(path, "quiet\n");
	wl_wait_sleeping();

	long bad = 0, first = -1;
	for (size_t p = 0; p < npages; p++) {
		if ((long)p == current)
			continue;
		for (size_t i = 0; i < WORDS; i++)
			if (region[p * WORDS + i] != journal[p]) {
				if (!bad++)
					first = (long)p;
				break;
			}
	}
	if (bad)
		wl_fail("%ld of %zu pages differ from their journal entry, the first is page %ld (holds %llu, journal %llu)",
			bad, npages, first, (unsigned long long)region[(size_t)first * WORDS],
			(unsigned long long)journal[first]);
	for (int k = 0; k < nmaps; k++)
		for (size_t i = 0; i < maps[k].words; i++)
			if (maps[k].addr[i] != maps[k].stamp * 1000003 + i) {
				wl_fail("small mapping %d (round %llu) differs at word %zu", k, (unsigned long long)maps[k].stamp,
					i);
				break;
			}
	wl_finish();
}
