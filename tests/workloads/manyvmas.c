/* Many VMAs (--vmas N, default 20000): one region whose pages alternate between read-write and
 * read-only, so that every page is its own VMA, each holding its own contents. After the restore
 * the layout and every page must be as they were. */
#include "workload.h"

#include <sys/mman.h>

#define PAGE 4096UL

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	long n = wl_opt_long("--vmas", 20000);
	if (n < 2)
		wl_die("--vmas must be at least 2");
	size_t len = (size_t)n * PAGE;
	unsigned char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		wl_die("mmap");
	for (long p = 0; p < n; p++)
		memset(base + (size_t)p * PAGE, (int)(p * 7 % 251 + 1), PAGE);
	for (long p = 1; p < n; p += 2)
		if (mprotect(base + (size_t)p * PAGE, PAGE, PROT_READ))
			wl_die("mprotect");
	static char maps_before[1 << 22], maps_after[1 << 22];
	if (wl_read_file("/proc/self/maps", maps_before, sizeof maps_before) < 0)
		wl_die("read maps");
	wl_ready();
	wl_wait_sleeping();

	if (wl_read_file("/proc/self/maps", maps_after, sizeof maps_after) < 0)
		wl_fail("cannot read maps");
	else if (strcmp(maps_before, maps_after))
		wl_fail("the memory map changed (%zu bytes of maps, were %zu)", strlen(maps_after), strlen(maps_before));
	for (long p = 0; p < n; p++) {
		unsigned char want = (unsigned char)(p * 7 % 251 + 1);
		const unsigned char *page = base + (size_t)p * PAGE;
		if (page[0] != want || page[PAGE - 1] != want || memcmp(page, page + 1, PAGE - 1)) {
			wl_fail("page %ld differs", p);
			break;
		}
	}
	wl_finish();
}
