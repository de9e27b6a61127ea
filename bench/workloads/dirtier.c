/* A large process (1 GiB by default) that dirties its memory at a controlled rate: pages are
 * rewritten in order, as many per iteration as keep the rate at RATE MB/s. Every page holds its
 * version in its first and last word, and an untouched pattern in between.
 * Usage: dirtier STAMPS [MIB] [RATE_MB_PER_S] */
#include "mig.h"

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static uint64_t *mem;
static uint32_t *version;
static uint64_t npages;

static inline uint64_t tag(uint64_t p, uint64_t ver)
{
	return (p << 32) ^ ver ^ 0xa5a5000000000000ULL;
}

static int verify(char *msg, size_t len)
{
	for (uint64_t p = 0; p < npages; p++) {
		uint64_t *w = mem + p * WORDS;
		uint64_t t = tag(p, version[p]);
		if (w[0] != t || w[WORDS - 1] != t || w[WORDS / 2] != ~p) {
			snprintf(msg, len, "page %llu: expected version %u", (unsigned long long)p,
				 version[p]);
			return 1;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	uint64_t mib = mig_arg(argc, argv, 2, 1024);
	uint64_t rate = mig_arg(argc, argv, 3, 64);
	npages = mib * 1024 * 1024 / PAGE;
	mig_init(argv[1], 50000, verify);
	mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	version = calloc(npages, sizeof *version);
	if (mem == MAP_FAILED || !version)
		mig_die("allocate");
	for (uint64_t p = 0; p < npages; p++) {
		uint64_t *w = mem + p * WORDS;
		for (uint64_t i = 0; i < WORDS; i++)
			w[i] = ~p;
		w[0] = w[WORDS - 1] = tag(p, 0);
	}
	mig_ready();
	uint64_t start = mig_now(), written = 0, cursor = 0;
	for (;;) {
		uint64_t due = (mig_now() - start) / 1000 * rate / PAGE;
		/* Catch up at most 256 pages per iteration so an iteration stays short. */
		for (int n = 0; written < due && n < 256; n++, written++) {
			uint64_t p = cursor++ % npages;
			uint64_t *w = mem + p * WORDS;
			version[p]++;
			w[0] = w[WORDS - 1] = tag(p, version[p]);
		}
		mig_tick();
	}
}
