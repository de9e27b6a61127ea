/* File locks across a dump and restore.
 *
 * In its scratch directory it holds:
 *   - "flock": an exclusive flock() through fd 10;
 *   - "ofd": an OFD write lock on bytes 0..99 through fd 11;
 *   - "posix": a POSIX write lock on bytes 10..19 through fd 12 (the harness checks it from
 *     outside with F_GETLK, since a process never conflicts with its own POSIX locks);
 *   - "shared": a shared flock() through fd 13.
 * After SIGUSR2 it opens each file again (a second open file description) and expects the
 * locks to still keep it out, and the shared lock to admit another shared one. */
#include "workload.h"

#include <sys/file.h>

static int open_at(const char *dir, const char *name, int target)
{
	char path[4200];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	int fd = open(path, O_RDWR | O_CREAT, 0600);
	if (fd < 0)
		wl_die("open");
	if (ftruncate(fd, 4096))
		wl_die("ftruncate");
	if (target >= 0 && fd != target) {
		if (dup2(fd, target) != target)
			wl_die("dup2");
		close(fd);
		fd = target;
	}
	return fd;
}

static struct flock range(short type, off_t start, off_t len)
{
	struct flock fl;
	memset(&fl, 0, sizeof fl);
	fl.l_type = type;
	fl.l_whence = SEEK_SET;
	fl.l_start = start;
	fl.l_len = len;
	return fl;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096];
	wl_dir(dir, sizeof dir);

	if (flock(open_at(dir, "flock", 10), LOCK_EX | LOCK_NB))
		wl_die("flock");
	struct flock ofd = range(F_WRLCK, 0, 100);
	if (fcntl(open_at(dir, "ofd", 11), F_OFD_SETLK, &ofd))
		wl_die("F_OFD_SETLK");
	struct flock posix = range(F_WRLCK, 10, 10);
	if (fcntl(open_at(dir, "posix", 12), F_SETLK, &posix))
		wl_die("F_SETLK");
	if (flock(open_at(dir, "shared", 13), LOCK_SH | LOCK_NB))
		wl_die("flock shared");

	wl_ready();
	wl_wait_sleeping();

	int again = open_at(dir, "flock", -1);
	if (flock(again, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
		wl_fail("flock no longer held (errno %d)", errno);
	close(again);

	again = open_at(dir, "ofd", -1);
	struct flock probe = range(F_WRLCK, 50, 10);
	if (fcntl(again, F_OFD_SETLK, &probe) == 0 || errno != EAGAIN)
		wl_fail("OFD lock no longer held (errno %d)", errno);
	probe = range(F_WRLCK, 200, 10);
	if (fcntl(again, F_OFD_SETLK, &probe))
		wl_fail("OFD lock grew beyond its range (errno %d)", errno);
	close(again);

	again = open_at(dir, "shared", -1);
	if (flock(again, LOCK_SH | LOCK_NB))
		wl_fail("shared flock became exclusive (errno %d)", errno);
	if (flock(again, LOCK_EX | LOCK_NB) == 0)
		wl_fail("shared flock no longer held");
	close(again);
	wl_finish();
}
