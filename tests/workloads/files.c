/* Open files: a read fd at an offset and a dup sharing it, a write fd at an offset, an O_APPEND
 * fd, a read-write O_CLOEXEC fd at a high number, /dev/null and /dev/zero, and stdout redirected
 * to a file. After the restore: the same fd numbers and no others, same flags, offsets, paths,
 * shared offsets still shared, appends still at the end. */
#include "workload.h"

struct fd_state {
	int fd;
	int fl, fd_flags;
	off_t pos;
	char link[4096];
};

static struct fd_state fds[32];
static int nfds;
static char fd_list_before[4096], fd_list_after[4096];

static void fd_list(char *out, size_t size)
{
	DIR *d = opendir("/proc/self/fd");
	out[0] = 0;
	if (!d)
		return;
	size_t len = 0;
	int nums[256], n = 0;
	struct dirent *e;
	while ((e = readdir(d)) && n < 256)
		if (e->d_name[0] != '.' && atoi(e->d_name) != dirfd(d))
			nums[n++] = atoi(e->d_name);
	closedir(d);
	for (int i = 0; i < n; i++) /* readdir order is not guaranteed: sort */
		for (int j = i + 1; j < n; j++)
			if (nums[j] < nums[i]) {
				int t = nums[i];
				nums[i] = nums[j];
				nums[j] = t;
			}
	for (int i = 0; i < n && len + 16 < size; i++)
		len += (size_t)snprintf(out + len, size - len, "%d ", nums[i]);
}

static void record(int fd)
{
	struct fd_state *s = &fds[nfds++];
	char path[64];
	s->fd = fd;
	s->fl = fcntl(fd, F_GETFL);
	s->fd_flags = fcntl(fd, F_GETFD);
	s->pos = lseek(fd, 0, SEEK_CUR);
	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, s->link, sizeof s->link - 1);
	s->link[n > 0 ? n : 0] = 0;
}

static int open_at(const char *path, int flags, int want_fd)
{
	int fd = open(path, flags, 0644);
	if (fd < 0)
		wl_die(path);
	if (fd != want_fd) {
		if (dup3(fd, want_fd, flags & O_CLOEXEC) < 0)
			wl_die("dup3");
		close(fd);
	}
	return want_fd;
}

static char text(size_t i)
{
	return (char)('a' + i * 7 % 26);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096], data[4200], out[4200], logp[4200], rw[4200];
	wl_dir(dir, sizeof dir);
	snprintf(data, sizeof data, "%s/data.txt", dir);
	snprintf(out, sizeof out, "%s/out.txt", dir);
	snprintf(logp, sizeof logp, "%s/log.txt", dir);
	snprintf(rw, sizeof rw, "%s/rw.bin", dir);
	{
		char content[4096];
		for (size_t i = 0; i < sizeof content; i++)
			content[i] = text(i);
		int fd = open(data, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd < 0 || write(fd, content, sizeof content) != sizeof content)
			wl_die("write data.txt");
		close(fd);
		fd = open(rw, O_WRONLY | O_CREAT | O_TRUNC, 0600);
		if (fd < 0 || write(fd, content, sizeof content) != sizeof content)
			wl_die("write rw.bin");
		close(fd);
	}
	int rd = open_at(data, O_RDONLY, 10);
	lseek(rd, 1234, SEEK_SET);
	int wr = open_at(out, O_WRONLY | O_CREAT | O_TRUNC, 11);
	char hundred[100];
	memset(hundred, 'w', sizeof hundred);
	if (write(wr, hundred, sizeof hundred) != sizeof hundred)
		wl_die("write out.txt");
	lseek(wr, 50, SEEK_SET);
	int ap = open_at(logp, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 12);
	if (write(ap, "line1\n", 6) != 6)
		wl_die("write log.txt");
	lseek(ap, 0, SEEK_SET); /* the offset is 0 but appends still go to the end */
	int null = open_at("/dev/null", O_RDWR, 13);
	int shared = dup2(rd, 14);
	int zero = open_at("/dev/zero", O_RDONLY, 15);
	int hi = open_at(rw, O_RDWR | O_CLOEXEC, 100);
	lseek(hi, 777, SEEK_SET);
	printf("before\n");
	fflush(stdout);
	int fd_order[] = { 0, 1, 2, rd, wr, ap, null, shared, zero, hi };
	for (size_t i = 0; i < sizeof fd_order / sizeof fd_order[0]; i++)
		record(fd_order[i]);
	fd_list(fd_list_before, sizeof fd_list_before);
	wl_ready();
	wl_wait_sleeping();

	fd_list(fd_list_after, sizeof fd_list_after);
	if (strcmp(fd_list_before, fd_list_after))
		wl_fail("open fds are [%s], were [%s]", fd_list_after, fd_list_before);
	for (int i = 0; i < nfds; i++) {
		struct fd_state was = fds[i];
		nfds = i; /* record() appends: reuse the slot past the end */
		record(was.fd);
		struct fd_state now = fds[i];
		fds[i] = was;
		nfds = (int)(sizeof fd_order / sizeof fd_order[0]);
		if (now.fl != was.fl)
			wl_fail("fd %d: flags %#o, were %#o", was.fd, now.fl, was.fl);
		if (now.fd_flags != was.fd_flags)
			wl_fail("fd %d: fd flags %#x, were %#x", was.fd, now.fd_flags, was.fd_flags);
		if (now.pos != was.pos)
			wl_fail("fd %d: offset %lld, was %lld", was.fd, (long long)now.pos, (long long)was.pos);
		if (strcmp(now.link, was.link))
			wl_fail("fd %d: is '%s', was '%s'", was.fd, now.link, was.link);
	}
	char buf[16];
	if (read(rd, buf, 10) != 10)
		wl_fail("read fd %d: %s", rd, strerror(errno));
	else
		for (size_t i = 0; i < 10; i++)
			if (buf[i] != text(1234 + i)) {
				wl_fail("fd %d read the wrong bytes", rd);
				break;
			}
	if (lseek(shared, 0, SEEK_CUR) != 1244)
		wl_fail("fd %d no longer shares its offset with fd %d", shared, rd);
	if (write(ap, "line2\n", 6) != 6)
		wl_fail("write O_APPEND fd");
	else {
		char log[64] = { 0 };
		wl_read_file(logp, log, sizeof log);
		if (strcmp(log, "line1\nline2\n"))
			wl_fail("O_APPEND file holds '%s'", log);
	}
	if (write(wr, "XY", 2) != 2)
		wl_fail("write fd %d", wr);
	else {
		char content[128] = { 0 };
		wl_read_file(out, content, sizeof content);
		if (strlen(content) != 100 || content[50] != 'X' || content[51] != 'Y' || content[49] != 'w')
			wl_fail("positioned write landed wrong: '%s'", content);
	}
	if (read(null, buf, sizeof buf) != 0 || write(null, "x", 1) != 1)
		wl_fail("/dev/null does not behave as /dev/null");
	memset(buf, 1, sizeof buf);
	if (read(zero, buf, sizeof buf) != sizeof buf || buf[0] || buf[15])
		wl_fail("/dev/zero does not read zeroes");
	if (pread(hi, buf, 3, 0) != 3 || buf[0] != text(0))
		wl_fail("fd %d reads the wrong file", hi);
	printf("after\n");
	fflush(stdout);
	wl_finish();
}
