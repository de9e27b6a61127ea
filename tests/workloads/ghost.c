/* A file that was deleted while still open (at an offset) and, with --mapped 1, a deleted file
 * that is still mapped. The restore must give back the same contents through the same fd (and
 * mapping), still deleted, without leaving a file behind in the directory. */
#include "workload.h"

#include <sys/mman.h>

static char content(size_t i)
{
	return (char)(i * 13 % 251);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096], path[4200], mpath[4200];
	wl_dir(dir, sizeof dir);
	snprintf(path, sizeof path, "%s/ghost.txt", dir);
	snprintf(mpath, sizeof mpath, "%s/ghost-mapped.bin", dir);
	size_t len = 10000;
	char *data = malloc(len);
	for (size_t i = 0; i < len; i++)
		data[i] = content(i);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
	if (fd < 0 || write(fd, data, len) != (ssize_t)len)
		wl_die("write ghost.txt");
	lseek(fd, 333, SEEK_SET);
	int mapped = wl_opt_long("--mapped", 0) != 0;
	int mfd = open(mpath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (mfd < 0 || write(mfd, data, 8192) != 8192)
		wl_die("write ghost-mapped.bin");
	char *map = NULL;
	if (mapped) {
		map = mmap(NULL, 8192, PROT_READ, MAP_PRIVATE, mfd, 0);
		if (map == MAP_FAILED)
			wl_die("mmap");
	}
	close(mfd);
	if (unlink(path) || unlink(mpath))
		wl_die("unlink");
	char link_before[4300];
	char proc[64];
	snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(proc, link_before, sizeof link_before - 1);
	link_before[n > 0 ? n : 0] = 0;
	wl_ready();
	wl_wait_sleeping();

	struct stat st;
	if (fstat(fd, &st)) {
		wl_fail("fstat fd %d: %s", fd, strerror(errno));
		wl_finish();
	}
	if (st.st_nlink != 0)
		wl_fail("the file has %lu links, it should be deleted", (unsigned long)st.st_nlink);
	if (st.st_size != (off_t)len)
		wl_fail("size %lld, expected %zu", (long long)st.st_size, len);
	if ((st.st_mode & 07777) != 0640)
		wl_fail("mode %o, expected 640", st.st_mode & 07777);
	if (lseek(fd, 0, SEEK_CUR) != 333)
		wl_fail("offset %lld, expected 333", (long long)lseek(fd, 0, SEEK_CUR));
	char *now = malloc(len);
	if (pread(fd, now, len, 0) != (ssize_t)len || memcmp(now, data, len))
		wl_fail("contents differ");
	if (mapped && memcmp(map, data, 8192))
		wl_fail("the mapping of the deleted file differs");
	char link_now[4300];
	n = readlink(proc, link_now, sizeof link_now - 1);
	link_now[n > 0 ? n : 0] = 0;
	/* The file may come back under a temporary name next to the old one (as CRIU's ghost files
	 * do), but it must be the same file, still deleted. */
	const char *deleted = " (deleted)";
	size_t ln = strlen(link_now), ld = strlen(deleted);
	if (strncmp(link_now, path, strlen(path)) || ln < ld || strcmp(link_now + ln - ld, deleted))
		wl_fail("fd link is '%s', was '%s'", link_now, link_before);
	if (access(path, F_OK) == 0 || access(mpath, F_OK) == 0)
		wl_fail("a deleted file is back in the directory");
	wl_finish();
}
