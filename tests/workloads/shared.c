/* Shared mappings: MAP_SHARED|MAP_ANONYMOUS memory with contents, and a MAP_SHARED mapping of a
 * file. After the restore both keep their contents, and the file mapping is still the file:
 * a store through the mapping shows in the file and a write to the file shows in the mapping. */
#include "workload.h"

#include <sys/mman.h>

#define PAGE 4096UL

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096], path[4200];
	wl_dir(dir, sizeof dir);
	snprintf(path, sizeof path, "%s/shared.dat", dir);

	size_t anon_len = 64 * PAGE;
	unsigned char *anon = mmap(NULL, anon_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (anon == MAP_FAILED)
		wl_die("mmap shared anon");
	for (size_t i = 0; i < anon_len; i++)
		anon[i] = (unsigned char)(i * 3 + 1);

	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || ftruncate(fd, 4 * PAGE))
		wl_die("create shared.dat");
	unsigned char *file = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (file == MAP_FAILED)
		wl_die("mmap shared file");
	close(fd);
	memset(file, 'a', 4 * PAGE);
	wl_ready();
	wl_wait_sleeping();

	for (size_t i = 0; i < anon_len; i++)
		if (anon[i] != (unsigned char)(i * 3 + 1)) {
			wl_fail("shared anonymous memory: byte %zu differs", i);
			break;
		}
	for (size_t i = 0; i < 4 * PAGE; i++)
		if (file[i] != 'a') {
			wl_fail("shared file mapping: byte %zu is %#x", i, file[i]);
			break;
		}
	file[100] = 'Z';
	fd = open(path, O_RDWR | O_CLOEXEC);
	char c = 0;
	if (fd < 0 || pread(fd, &c, 1, 100) != 1 || c != 'Z')
		wl_fail("a store through the shared mapping does not reach the file");
	if (fd >= 0 && pwrite(fd, "Q", 1, 200) == 1 && file[200] != 'Q')
		wl_fail("a write to the file does not show in the shared mapping");
	wl_finish();
}
