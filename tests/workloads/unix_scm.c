/* File descriptors in flight (SCM_RIGHTS queued on unix sockets), checked after restore.
 *
 *   unix_scm --ready READY --result RESULT
 *
 * Sets up, in its own directory (that of READY), a stream socketpair whose receiving end
 * has three messages queued, each with fds no one has received yet:
 *   - "F" with a regular file ("data.txt") read up to offset 7, which this process then
 *     closes: the file lives on only in flight;
 *   - "E" with the read end of a pipe holding bytes (both ends then closed here) and an
 *     eventfd that this process keeps open at its own fd;
 *   - "S" with one end of another stream socketpair that has "inner" queued, closed here;
 *     the process keeps the other end;
 * and a datagram socketpair with one datagram "dgram" carrying the eventfd again.
 * With "--pidfd", another socketpair also holds a pidfd in flight, which a dump refuses.
 * After SIGUSR2 it receives everything: the file reads on from offset 7, the pipe gives its
 * bytes and then end of file, the eventfd received is the very object of its own fd (a write
 * through one is read through the other, both ways), the socket in flight holds "inner" and
 * is still connected to the kept end, and nothing else is queued.
 */
#include "workload.h"

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#define FILE_TEXT "0123456789abcdefghij"
#define PIPE_TEXT "through the pipe"

static void send_fds(int sock, const char *tag, size_t len, const int *fds, int nfds)
{
	char cbuf[CMSG_SPACE(4 * sizeof(int))];
	memset(cbuf, 0, sizeof cbuf);
	struct iovec iov = { .iov_base = (void *)tag, .iov_len = len };
	struct msghdr mh = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = cbuf,
		.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int)),
	};
	struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
	memcpy(CMSG_DATA(cm), fds, (size_t)nfds * sizeof(int));
	if (sendmsg(sock, &mh, 0) != (ssize_t)len)
		wl_die("sendmsg SCM_RIGHTS");
}

/* Receives one message of LEN bytes that must read TAG, with WANT fds into FDS. */
static int recv_fds(int sock, const char *tag, size_t len, int *fds, int want)
{
	char data[16] = { 0 };
	char cbuf[CMSG_SPACE(4 * sizeof(int))];
	struct iovec iov = { .iov_base = data, .iov_len = len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
	ssize_t n = recvmsg(sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	if (n != (ssize_t)len || memcmp(data, tag, len)) {
		wl_fail("message %s: got %zd bytes \"%.*s\" (errno %d)", tag, n, n > 0 ? (int)n : 0, data, errno);
		return -1;
	}
	struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
	if (!cm || cm->cmsg_type != SCM_RIGHTS || cm->cmsg_len != CMSG_LEN((size_t)want * sizeof(int))) {
		wl_fail("message %s: not the %d fds sent with it", tag, want);
		return -1;
	}
	memcpy(fds, CMSG_DATA(cm), (size_t)want * sizeof(int));
	return 0;
}

static void expect_read(int fd, const char *want, const char *what)
{
	char buf[64] = { 0 };
	size_t len = strlen(want);
	ssize_t n = read(fd, buf, len);
	if (n != (ssize_t)len || memcmp(buf, want, len))
		wl_fail("%s: read %zd bytes \"%.*s\", wanted \"%s\"", what, n, n > 0 ? (int)n : 0, buf, want);
}

static void expect_recv(int fd, const char *want, const char *what)
{
	char buf[64] = { 0 };
	ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
	if (n != (ssize_t)strlen(want) || memcmp(buf, want, strlen(want)))
		wl_fail("%s: received %zd bytes \"%.*s\", wanted \"%s\"", what, n, n > 0 ? (int)n : 0, buf, want);
}

/* A value written to eventfd FROM is read back from eventfd TO. */
static void expect_same_eventfd(int from, int to, uint64_t value, const char *what)
{
	uint64_t got = 0;
	if (write(from, &value, sizeof value) != sizeof value || read(to, &got, sizeof got) != sizeof got ||
	    got != value)
		wl_fail("%s: wrote %llu, read %llu (errno %d)", what, (unsigned long long)value, (unsigned long long)got,
			errno);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096], path[4200];
	wl_dir(dir, sizeof dir);

	int sv[2], dg[2], inner[2], p[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) ||
	    socketpair(AF_UNIX, SOCK_STREAM, 0, inner) || pipe(p))
		wl_die("socketpair/pipe");

	snprintf(path, sizeof path, "%s/data.txt", dir);
	int file = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	char head[7];
	if (file < 0 || write(file, FILE_TEXT, strlen(FILE_TEXT)) != (ssize_t)strlen(FILE_TEXT) ||
	    lseek(file, 0, SEEK_SET) != 0 || read(file, head, sizeof head) != sizeof head)
		wl_die("data.txt");
	send_fds(sv[0], "F", 1, &file, 1);
	close(file);

	int efd = eventfd(5, EFD_NONBLOCK);
	if (efd < 0 || write(p[1], PIPE_TEXT, strlen(PIPE_TEXT)) != (ssize_t)strlen(PIPE_TEXT))
		wl_die("eventfd/pipe data");
	int pe[2] = { p[0], efd };
	send_fds(sv[0], "E", 1, pe, 2);
	close(p[0]);
	close(p[1]);

	if (send(inner[0], "inner", 5, 0) != 5)
		wl_die("send inner");
	send_fds(sv[0], "S", 1, &inner[1], 1);
	close(inner[1]);

	send_fds(dg[0], "dgram", 5, &efd, 1);

	int px[2] = { -1, -1 };
	if (wl_argc > 0 && !strcmp(wl_argv[0], "--pidfd")) {
		int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
		if (pidfd < 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, px))
			wl_die("pidfd/socketpair");
		send_fds(px[0], "X", 1, &pidfd, 1);
		close(pidfd);
	}

	wl_ready();
	wl_wait_sleeping();

	int got[2];
	if (recv_fds(sv[1], "F", 1, got, 1) == 0) {
		expect_read(got[0], "789ab", "file in flight (from offset 7)");
		close(got[0]);
	}
	if (recv_fds(sv[1], "E", 1, got, 2) == 0) {
		expect_read(got[0], PIPE_TEXT, "pipe in flight");
		char more;
		ssize_t n = read(got[0], &more, 1);
		if (n != 0)
			wl_fail("pipe in flight: %zd more bytes or a writer left (errno %d)", n, errno);
		uint64_t counter = 0;
		if (read(got[1], &counter, sizeof counter) != sizeof counter || counter != 5)
			wl_fail("eventfd in flight: counter %llu, wanted 5", (unsigned long long)counter);
		expect_same_eventfd(efd, got[1], 3, "eventfd: own fd to the one in flight");
		expect_same_eventfd(got[1], efd, 4, "eventfd: the one in flight to own fd");
		close(got[0]);
		close(got[1]);
	}
	if (recv_fds(sv[1], "S", 1, got, 1) == 0) {
		expect_recv(got[0], "inner", "socket in flight: its queue");
		if (send(inner[0], "more", 4, 0) != 4)
			wl_fail("kept end: send: errno %d", errno);
		expect_recv(got[0], "more", "socket in flight: from its peer");
		if (send(got[0], "back", 4, 0) != 4)
			wl_fail("socket in flight: send: errno %d", errno);
		expect_recv(inner[0], "back", "kept end: from the socket in flight");
		close(got[0]);
	}
	if (recv_fds(dg[1], "dgram", 5, got, 1) == 0) {
		expect_same_eventfd(efd, got[0], 9, "eventfd sent by datagram");
		close(got[0]);
	}
	if (px[1] >= 0 && recv_fds(px[1], "X", 1, got, 1) == 0)
		close(got[0]);
	char extra;
	if (recv(sv[1], &extra, 1, MSG_DONTWAIT) != -1 || errno != EAGAIN)
		wl_fail("stream: more queued than was sent");
	wl_finish();
}
