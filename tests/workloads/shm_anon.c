/* Shared anonymous memory: one MAP_SHARED|MAP_ANONYMOUS object mapped twice, the second time
 * through a reopen of /proc/self/map_files at a page offset (what a second process does after
 * restore), with pages never written left as holes. With --child 1 a child process maps it too
 * (inherited through fork) and answers requests through it; the ready file says "child=PID"
 * (-1 without). After restore: the contents are
 * back, both mappings are still one object (a store through one shows through the other, and
 * /proc/self/maps names the same inode), and the child, if any, still shares it. --pages N
 * sizes the object (64 pages by default). */
#include "workload.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define PAGE 4096UL
#define ALIAS_OFF 4UL
#define ALIAS_PAGES 16UL

static unsigned char pattern(size_t i)
{
	return (unsigned char)(i * 7 + 3);
}

/* Page 0 is the request/answer area of the child; pages 10..13 are never written. */
static int written_page(size_t page)
{
	return page < 10 || page > 13;
}

/* The shmem inode of the mapping at ADDR, from /proc/self/maps. */
static unsigned long maps_inode(void *addr)
{
	static char buf[65536];
	if (wl_read_file("/proc/self/maps", buf, sizeof buf) < 0)
		return 0;
	for (char *line = buf; line && *line;) {
		unsigned long start, end, ino;
		char perms[8];
		if (sscanf(line, "%lx-%lx %7s %*s %*s %lu", &start, &end, perms, &ino) == 4 && start == (unsigned long)addr)
			return strstr(line, "/dev/zero") ? ino : 0;
		char *nl = strchr(line, '\n');
		line = nl ? nl + 1 : NULL;
	}
	return 0;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	int with_child = (int)wl_opt_long("--child", 0);
	long pages = wl_opt_long("--pages", 64);
	if (pages < 20)
		pages = 20;
	size_t len = (size_t)pages * PAGE;
	unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		wl_die("mmap shared anonymous");
	for (size_t i = PAGE; i < len; i++)
		if (written_page(i / PAGE))
			mem[i] = pattern(i);

	char path[128];
	snprintf(path, sizeof path, "/proc/self/map_files/%lx-%lx", (unsigned long)mem, (unsigned long)mem + len);
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		wl_die("open map_files");
	unsigned char *alias = mmap(NULL, ALIAS_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, ALIAS_OFF * PAGE);
	if (alias == MAP_FAILED)
		wl_die("mmap the reopened object");
	close(fd);
	if (alias[0] != pattern(ALIAS_OFF * PAGE))
		wl_die("the alias does not show the object");

	volatile uint32_t *req = (volatile uint32_t *)mem;
	pid_t child = -1;
	if (with_child) {
		child = fork();
		if (child < 0)
			wl_die("fork");
		if (child == 0) {
			/* Answers each request n with n * 3 + 1 until asked to stop (0xffffffff), or
			 * until its parent is gone (a failed test must leave nothing behind). */
			pid_t parent = getppid();
			for (;;) {
				uint32_t n = req[0];
				if (n == 0xffffffffu)
					_exit(0);
				if (getppid() != parent)
					_exit(1);
				if (n && req[1] != n * 3 + 1)
					req[1] = n * 3 + 1;
				struct timespec ts = { 0, 1000 * 1000 };
				nanosleep(&ts, NULL);
			}
		}
		req[0] = 5;
		while (req[1] != 16)
			usleep(1000);
	}
	unsigned long inode = maps_inode(mem);
	char ready[64];
	snprintf(ready, sizeof ready, "child=%d\n", (int)child);
	wl_ready_with(ready);
	wl_wait_sleeping();

	for (size_t i = PAGE; i < len; i++) {
		unsigned char want = written_page(i / PAGE) ? pattern(i) : 0;
		if (mem[i] != want) {
			wl_fail("byte %zu is %#x, expected %#x", i, mem[i], want);
			break;
		}
	}
	for (size_t i = 0; i < ALIAS_PAGES * PAGE; i++) {
		size_t at = ALIAS_OFF * PAGE + i;
		unsigned char want = written_page(at / PAGE) ? pattern(at) : 0;
		if (alias[i] != want) {
			wl_fail("alias byte %zu is %#x, expected %#x", i, alias[i], want);
			break;
		}
	}
	mem[ALIAS_OFF * PAGE + 5] = 0xab;
	if (alias[5] != 0xab)
		wl_fail("a store through the first mapping does not show through the second");
	alias[11 * PAGE - ALIAS_OFF * PAGE] = 0xcd;
	if (mem[11 * PAGE] != 0xcd)
		wl_fail("a store through the second mapping does not show through the first");
	unsigned long now = maps_inode(mem);
	if (!now || now != maps_inode(alias))
		wl_fail("the two mappings are not one shmem object in maps (%lu, %lu)", now, maps_inode(alias));
	if (inode == 0)
		wl_fail("before the dump the mapping was not /dev/zero (deleted)");
	if (with_child) {
		req[0] = 7;
		for (int i = 0; i < 5000 && req[1] != 22; i++)
			usleep(1000);
		if (req[1] != 22)
			wl_fail("the child does not answer through the shared memory (%u)", req[1]);
		req[0] = 0xffffffffu;
		int status = 0;
		if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status))
			wl_fail("the child did not exit cleanly (%#x)", status);
	}
	wl_finish();
}
