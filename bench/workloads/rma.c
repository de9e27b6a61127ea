/* The thesis's Random Memory Access process: rewrites random pages of a 4 MiB region as fast as it
 * can, keeping a version per page so that after migration it can prove no write was lost.
 * Usage: rma STAMPS [MIB] */
#include "mig.h"

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static uint64_t *mem;
static uint32_t *version;
static uint64_t npages;

static inline uint64_t word(uint64_t page, uint64_t ver, uint64_t i)
{
	return (page << 40) ^ (ver << 12) ^ i ^ 0x5bd1e995ULL;
}

static void fill(uint64_t p)
{
	uint64_t *w = mem + p * WORDS;
	for (uint64_t i = 0; i < WORDS; i++)
		w[i] = word(p, version[p], i);
}

static int verify(char *msg, size_t len)
{
	for (uint64_t p = 0; p < npages; p++)
		for (uint64_t i = 0; i < WORDS; i++)
			if (mem[p * WORDS + i] != word(p, version[p], i)) {
				snprintf(msg, len, "page %llu word %llu: lost write (version %u)",
					 (unsigned long long)p, (unsigned long long)i, version[p]);
				return 1;
			}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	uint64_t mib = mig_arg(argc, argv, 2, 4);
	npages = mib * 1024 * 1024 / PAGE;
	mig_init(argv[1], 50000, verify);
	mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	version = calloc(npages, sizeof *version);
	if (mem == MAP_FAILED || !version)
		mig_die("allocate");
	for (uint64_t p = 0; p < npages; p++)
		fill(p);
	uint64_t seed = 88172645463325252ULL;
	mig_ready();
	for (;;) {
		uint64_t p = mig_xorshift(&seed) % npages;
		version[p]++;
		fill(p);
		mig_tick();
	}
}
