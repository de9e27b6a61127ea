/* The thesis's 100 KB Reference process: sweeps all pages of its data every iteration, doing a
 * little arithmetic on each, so every page is dirty all the time.
 * Usage: reference STAMPS */
#include "mig.h"

#define PAGE 4096UL
/* 20 pages of data plus the static binary's own data, bss, stack and heap make about 100 KB of
 * dumped memory. */
#define PAGES 20
#define STRIDE 64

static uint64_t data[PAGES][PAGE / 8];
static uint64_t generation;

static inline uint64_t expected(uint64_t gen, uint64_t p, uint64_t i)
{
	uint64_t x = gen * 0x9e3779b97f4a7c15ULL + p * 1315423911ULL + i;
	return x ^ (x >> 29);
}

static void sweep(void)
{
	generation++;
	for (uint64_t p = 0; p < PAGES; p++)
		for (uint64_t i = 0; i < PAGE / 8; i += STRIDE)
			data[p][i] = expected(generation, p, i);
}

static int verify(char *msg, size_t len)
{
	for (uint64_t p = 0; p < PAGES; p++)
		for (uint64_t i = 0; i < PAGE / 8; i += STRIDE)
			if (data[p][i] != expected(generation, p, i)) {
				snprintf(msg, len, "page %llu word %llu differs at generation %llu",
					 (unsigned long long)p, (unsigned long long)i,
					 (unsigned long long)generation);
				return 1;
			}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	mig_init(argv[1], 50000, verify);
	sweep();
	mig_ready();
	for (;;) {
		sweep();
		mig_tick();
	}
}
