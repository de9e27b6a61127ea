/* MAP_SHARED file mappings on tmpfs (/dev/shm, whose device numbers look like those of
 * anonymous shared memory) and on the workload's own directory. After restore each mapping
 * is still its file: a store through the mapping reaches the file, and a write to the file
 * shows in the mapping. */
#include "workload.h"

#include <sys/mman.h>

#define PAGE 4096UL
#define LEN (3 * PAGE)

static unsigned char *map_file(const char *path)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || ftruncate(fd, LEN))
		wl_die("create a mapped file");
	unsigned char *p = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		wl_die("mmap a file shared");
	close(fd);
	for (size_t i = 0; i < LEN; i++)
		p[i] = (unsigned char)('a' + i % 26);
	return p;
}

static void check(const char *path, unsigned char *p)
{
	for (size_t i = 0; i < LEN; i++)
		if (p[i] != (unsigned char)('a' + i % 26)) {
			wl_fail("%s: byte %zu is %#x", path, i, p[i]);
			return;
		}
	p[PAGE + 7] = 'Z';
	int fd = open(path, O_RDWR | O_CLOEXEC);
	char c = 0;
	if (fd < 0 || pread(fd, &c, 1, PAGE + 7) != 1 || c != 'Z')
		wl_fail("%s: a store through the mapping does not reach the file", path);
	if (fd >= 0 && (pwrite(fd, "Q", 1, 2 * PAGE + 1) != 1 || p[2 * PAGE + 1] != 'Q'))
		wl_fail("%s: a write to the file does not show in the mapping", path);
	if (fd >= 0)
		close(fd);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096], local[4200], tmpfs[128];
	wl_dir(dir, sizeof dir);
	snprintf(local, sizeof local, "%s/shm_file.dat", dir);
	snprintf(tmpfs, sizeof tmpfs, "/dev/shm/ckpt-shm-file-%d", (int)getpid());
	unsigned char *a = map_file(local);
	unsigned char *b = map_file(tmpfs);
	wl_ready();
	wl_wait_sleeping();
	check(local, a);
	check(tmpfs, b);
	unlink(tmpfs);
	wl_finish();
}
