/* Memory that changes while the mappings do not: N threads (--threads N, default 2) rewrite
 * random pages of their own slice of one region (--mib M, default 8) as fast as they can, every
 * word of a page from its version number, which they count in a table. Nothing is mapped or
 * unmapped after the start, so a dump taken a few milliseconds after another differs from it in
 * registers and page contents only: what a prepared restore applies without starting over.
 * On SIGUSR2 the threads stop and every page must match its version: a page that a migration
 * took from the wrong moment shows up as a mismatch. Each thread also counts its writes in a
 * register, which a migration carries with the thread's state: the versions of its slice must
 * add up to that count, or the memory is older than the registers (a page written since the
 * first of two dumps that did not reach the destination). Built optimised whatever the build,
 * so that the count stays in a register. --pace US: each thread writes one page every US
 * microseconds (spinning on the vDSO clock, no syscall), so that most pages stay unwritten
 * for milliseconds at a time. --untouched: the region is not filled first, so that pages are
 * first touched (and their memory made) while a migration goes on; a page never written
 * must read as zeroes. The ready file holds "threads=N". */
#pragma GCC optimize("O2")
#include "workload.h"

#include <pthread.h>
#include <sys/mman.h>

#define WORDS (4096 / 8)
#define MAX_THREADS 16

static uint64_t *region;
static uint32_t *version;
static size_t npages;
static int nthreads;
static volatile int stop;
static volatile int stopped;
static uint64_t writes[MAX_THREADS];
static double pace;

static uint64_t word(size_t page, uint32_t ver, size_t i)
{
	return ((uint64_t)page << 40) ^ ((uint64_t)ver << 12) ^ i ^ 0x5bd1e995ULL;
}

static void fill(size_t page)
{
	uint64_t *w = region + page * WORDS;
	for (size_t i = 0; i < WORDS; i++)
		w[i] = word(page, version[page], i);
}

static void *writer(void *arg)
{
	size_t n = (size_t)(uintptr_t)arg;
	size_t per = npages / (size_t)nthreads;
	size_t first = n * per;
	uint64_t seed = 0x9E3779B97F4A7C15ULL * (n + 1);
	uint64_t count = 0;
	double next = wl_now();
	while (!stop) {
		if (pace > 0) {
			next += pace;
			while (wl_now() < next && !stop)
				;
		}
		seed ^= seed << 13;
		seed ^= seed >> 7;
		seed ^= seed << 17;
		size_t page = first + seed % per;
		version[page]++;
		fill(page);
		count++;
	}
	writes[n] = count;
	__atomic_add_fetch(&stopped, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	nthreads = (int)wl_opt_long("--threads", 2);
	if (nthreads < 1 || nthreads > MAX_THREADS)
		wl_die("--threads");
	npages = ((size_t)wl_opt_long("--mib", 8) << 20) / 4096;
	pace = (double)wl_opt_long("--pace", 0) / 1e6;
	int untouched = wl_opt_long("--untouched", 0) != 0;
	region = mmap(NULL, npages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	version = mmap(NULL, npages * sizeof *version, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED || version == MAP_FAILED)
		wl_die("mmap");
	if (!untouched)
		for (size_t p = 0; p < npages; p++)
			fill(p);
	pthread_t threads[MAX_THREADS];
	for (int i = 0; i < nthreads; i++)
		if (pthread_create(&threads[i], NULL, writer, (void *)(uintptr_t)i))
			wl_die("pthread_create");
	char ready[64];
	snprintf(ready, sizeof ready, "threads=%d\n", nthreads);
	wl_ready_with(ready);
	wl_wait_sleeping();
	stop = 1;
	for (int i = 0; i < nthreads; i++)
		pthread_join(threads[i], NULL);
	if (stopped != nthreads)
		wl_fail("%d of %d writers stopped", stopped, nthreads);
	size_t bad = 0, first_bad = 0;
	for (size_t p = 0; p < npages; p++)
		for (size_t i = 0; i < WORDS; i++)
			if (region[p * WORDS + i] != (untouched && !version[p] ? 0 : word(p, version[p], i))) {
				if (!bad++)
					first_bad = p;
				break;
			}
	if (bad)
		wl_fail("%zu of %zu pages differ from their version, the first is page %zu", bad, npages, first_bad);
	size_t per = npages / (size_t)nthreads;
	for (int n = 0; n < nthreads; n++) {
		uint64_t sum = 0;
		for (size_t p = (size_t)n * per; p < (size_t)(n + 1) * per; p++)
			sum += version[p];
		/* The count may be taken a write before or after the version moved. */
		if (sum + 1 < writes[n] || sum > writes[n] + 1)
			wl_fail("thread %d wrote %llu times, its pages count %llu writes", n,
				(unsigned long long)writes[n], (unsigned long long)sum);
	}
	wl_finish();
}
