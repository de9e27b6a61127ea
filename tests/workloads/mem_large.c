/* A large anonymous region (default 256 MiB, --mib N) filled with a per-page pseudo-random
 * pattern. The ready file holds "addr=0x... len=N" so that a benchmark can read the same memory
 * with process_vm_readv. After the restore every page is verified. */
#include "workload.h"

#include <sys/mman.h>

static uint64_t word(uint64_t page, uint64_t i)
{
	/* splitmix64 of (page, index): cheap, and any misplaced page shows */
	uint64_t z = page * 0x9e3779b97f4a7c15ULL + i + 1;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	size_t len = (size_t)wl_opt_long("--mib", 256) << 20;
	uint64_t *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		wl_die("mmap");
	size_t words_per_page = 4096 / sizeof(uint64_t);
	size_t pages = len / 4096;
	for (size_t pg = 0; pg < pages; pg++)
		for (size_t i = 0; i < words_per_page; i++)
			mem[pg * words_per_page + i] = word(pg, i);

	char ready[128];
	snprintf(ready, sizeof ready, "addr=%p len=%zu\n", (void *)mem, len);
	wl_ready_with(ready);
	wl_wait_sleeping();

	size_t bad = 0, first_bad = 0;
	for (size_t pg = 0; pg < pages; pg++)
		for (size_t i = 0; i < words_per_page; i++)
			if (mem[pg * words_per_page + i] != word(pg, i)) {
				if (!bad++)
					first_bad = pg;
				break;
			}
	if (bad)
		wl_fail("%zu of %zu pages differ, the first is page %zu", bad, pages, first_bad);
	wl_finish();
}
