/* FIFOs and pipe attributes across a dump and restore.
 *
 * Sets up, in its scratch directory:
 *   - FIFO "fifo": read end at fd 20 (O_NONBLOCK), write end at fd 21, 5000 unread bytes;
 *   - FIFO "fifo2": one read-write fd 22 holding 100 unread bytes;
 *   - FIFO "fifo3": only a write end (fd 23) with 300 unread bytes, written while a reader
 *     that has closed since was there;
 *   - a pipe shrunk to 4096 bytes of capacity (fds 24/25), read end O_NONBLOCK, 1000 bytes in it;
 *   - an empty packet-mode pipe (O_DIRECT write end, fds 26/27).
 * After SIGUSR2 it checks that every byte, capacity and flag is back, and that the packet
 * pipe still keeps packets apart. */
#include "workload.h"

#include <sys/stat.h>

#define FIFO_BYTES 5000
#define FIFO2_BYTES 100
#define FIFO3_BYTES 300
#define PIPE_BYTES 1000
#define SMALL_PIPE 4096

static unsigned char pattern(int i, int salt) { return (unsigned char)(i * 13 + salt); }

static void put(int fd, int n, int salt)
{
	unsigned char buf[8192];
	for (int i = 0; i < n; i++)
		buf[i] = pattern(i, salt);
	if (write(fd, buf, (size_t)n) != n)
		wl_die("fill");
}

static void move_to(int fd, int target)
{
	if (fd == target)
		return;
	if (dup2(fd, target) != target)
		wl_die("dup2");
	close(fd);
}

static void expect_bytes(int fd, int n, int salt, const char *what)
{
	unsigned char buf[8192];
	int flags = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, flags | O_NONBLOCK);
	ssize_t got = read(fd, buf, sizeof buf);
	fcntl(fd, F_SETFL, flags);
	if (got != n) {
		wl_fail("%s: %zd unread bytes, expected %d (errno %d)", what, got, n, errno);
		return;
	}
	for (int i = 0; i < n; i++)
		if (buf[i] != pattern(i, salt)) {
			wl_fail("%s: byte %d differs", what, i);
			return;
		}
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096], path[4200];
	wl_dir(dir, sizeof dir);

	snprintf(path, sizeof path, "%s/fifo", dir);
	if (mkfifo(path, 0600))
		wl_die("mkfifo fifo");
	move_to(open(path, O_RDONLY | O_NONBLOCK), 20);
	move_to(open(path, O_WRONLY), 21);
	put(21, FIFO_BYTES, 1);

	snprintf(path, sizeof path, "%s/fifo2", dir);
	if (mkfifo(path, 0600))
		wl_die("mkfifo fifo2");
	move_to(open(path, O_RDWR), 22);
	put(22, FIFO2_BYTES, 2);

	snprintf(path, sizeof path, "%s/fifo3", dir);
	if (mkfifo(path, 0600))
		wl_die("mkfifo fifo3");
	int reader = open(path, O_RDONLY | O_NONBLOCK);
	move_to(open(path, O_WRONLY), 23);
	put(23, FIFO3_BYTES, 3);
	close(reader);

	int p[2];
	if (pipe(p))
		wl_die("pipe");
	move_to(p[0], 24);
	move_to(p[1], 25);
	if (fcntl(25, F_SETPIPE_SZ, SMALL_PIPE) < 0)
		wl_die("F_SETPIPE_SZ");
	fcntl(24, F_SETFL, O_NONBLOCK);
	put(25, PIPE_BYTES, 4);

	if (pipe2(p, O_DIRECT))
		wl_die("pipe2 O_DIRECT");
	move_to(p[0], 26);
	move_to(p[1], 27);

	wl_ready();
	wl_wait_sleeping();

	expect_bytes(20, FIFO_BYTES, 1, "fifo");
	if (!(fcntl(20, F_GETFL) & O_NONBLOCK))
		wl_fail("fifo read end lost O_NONBLOCK");
	if ((fcntl(21, F_GETFL) & O_ACCMODE) != O_WRONLY)
		wl_fail("fifo write end is not O_WRONLY");
	if (write(21, "x", 1) != 1)
		wl_fail("fifo write end does not write");
	char one;
	if (read(20, &one, 1) != 1 || one != 'x')
		wl_fail("fifo ends are not one FIFO");
	struct stat st;
	snprintf(path, sizeof path, "%s/fifo", dir);
	struct stat fd_st;
	if (stat(path, &st) || fstat(20, &fd_st) || st.st_ino != fd_st.st_ino)
		wl_fail("fd 20 is not the FIFO at its path");

	if ((fcntl(22, F_GETFL) & O_ACCMODE) != O_RDWR)
		wl_fail("fifo2 is not O_RDWR");
	expect_bytes(22, FIFO2_BYTES, 2, "fifo2");

	snprintf(path, sizeof path, "%s/fifo3", dir);
	int r3 = open(path, O_RDONLY | O_NONBLOCK);
	if (r3 < 0)
		wl_fail("reopen fifo3: errno %d", errno);
	else {
		expect_bytes(r3, FIFO3_BYTES, 3, "fifo3");
		close(r3);
	}

	int size = fcntl(25, F_GETPIPE_SZ);
	if (size != SMALL_PIPE)
		wl_fail("pipe capacity %d, expected %d", size, SMALL_PIPE);
	if (!(fcntl(24, F_GETFL) & O_NONBLOCK))
		wl_fail("pipe read end lost O_NONBLOCK");
	if (fcntl(25, F_GETFL) & O_NONBLOCK)
		wl_fail("pipe write end gained O_NONBLOCK");
	expect_bytes(24, PIPE_BYTES, 4, "pipe");

	if (!(fcntl(27, F_GETFL) & O_DIRECT))
		wl_fail("packet pipe lost O_DIRECT");
	if (write(27, "abc", 3) != 3 || write(27, "defgh", 5) != 5)
		wl_fail("packet pipe: write");
	char pkt[16];
	/* Never block: a pipe that lost packet mode returns everything at once. */
	fcntl(26, F_SETFL, O_NONBLOCK);
	ssize_t first = read(26, pkt, sizeof pkt);
	ssize_t second = read(26, pkt, sizeof pkt);
	if (first != 3 || second != 5)
		wl_fail("packet pipe: packets of %zd and %zd bytes, expected 3 and 5", first, second);
	wl_finish();
}
