/* memfd: a named memfd of an unaligned size, sealed against growing and shrinking, used
 * through its fd (with an offset) and through a shared and a private mapping. After restore:
 * the name, size, seals (F_GET_SEALS), offset and contents are back, the fd and the shared
 * mapping still see the same inode, the seals still refuse growth, and the private mapping
 * keeps its own copy of the page it wrote. */
#include "workload.h"

#include <sys/mman.h>

#define PAGE 4096UL
#define SIZE (3 * PAGE + 100)
#define POS 1234

static unsigned char pattern(size_t i)
{
	return (unsigned char)(i * 13 + 5);
}

static uint64_t checksum(const unsigned char *p, size_t n)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 1099511628211ULL;
	return h;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	int fd = memfd_create("ckpt-memfd-test", MFD_ALLOW_SEALING);
	if (fd < 0)
		wl_die("memfd_create");
	static unsigned char buf[SIZE];
	for (size_t i = 0; i < SIZE; i++)
		buf[i] = pattern(i);
	if (write(fd, buf, SIZE) != (ssize_t)SIZE)
		wl_die("write memfd");
	uint64_t sum = checksum(buf, SIZE);
	unsigned char *shared = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	unsigned char *private = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, PAGE);
	if (shared == MAP_FAILED || private == MAP_FAILED)
		wl_die("mmap memfd");
	private[10] = 0x99; /* a copy-on-write page of its own */
	if (fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK))
		wl_die("F_ADD_SEALS");
	if (lseek(fd, POS, SEEK_SET) != POS)
		wl_die("lseek");
	wl_ready();
	wl_wait_sleeping();

	int seals = fcntl(fd, F_GET_SEALS);
	if (seals != (F_SEAL_GROW | F_SEAL_SHRINK))
		wl_fail("seals are %#x, expected %#x", seals, F_SEAL_GROW | F_SEAL_SHRINK);
	struct stat st;
	if (fstat(fd, &st) || st.st_size != (off_t)SIZE)
		wl_fail("size is %lld, expected %lu", (long long)st.st_size, SIZE);
	if (lseek(fd, 0, SEEK_CUR) != POS)
		wl_fail("the fd's offset is %lld, expected %d", (long long)lseek(fd, 0, SEEK_CUR), POS);
	char link[256] = "", path[64];
	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, link, sizeof link - 1);
	if (n > 0)
		link[n] = 0;
	if (strcmp(link, "/memfd:ckpt-memfd-test (deleted)"))
		wl_fail("the fd is %s", link);
	static unsigned char back[SIZE];
	if (pread(fd, back, SIZE, 0) != (ssize_t)SIZE || checksum(back, SIZE) != sum)
		wl_fail("the contents read through the fd differ");
	if (checksum(shared, SIZE) != sum)
		wl_fail("the contents seen through the shared mapping differ");
	if (private[10] != 0x99 || private[11] != pattern(PAGE + 11))
		wl_fail("the private mapping lost its copy (%#x, %#x)", private[10], private[11]);
	shared[PAGE + 10] = 0x42;
	if (pread(fd, back, 1, PAGE + 10) != 1 || back[0] != 0x42)
		wl_fail("a store through the shared mapping does not reach the fd");
	if (private[10] != 0x99)
		wl_fail("the private copy changed with the file");
	if (ftruncate(fd, 2 * SIZE) == 0 || errno != EPERM)
		wl_fail("the memfd grew despite F_SEAL_GROW");
	wl_finish();
}
