/* Unix sockets with state, checked after restore.
 *
 *   unix_sockets --ready READY --result RESULT
 *
 * Sets up, in its own directory (that of READY):
 *   - a stream socketpair with bytes queued both ways, SO_RCVBUF raised on one end and
 *     SO_PASSCRED on the other, and O_NONBLOCK on one end;
 *   - a datagram socketpair with 3 datagrams queued;
 *   - a seqpacket socketpair with 2 records queued, whose sender then shut its writing side;
 *   - a stream listener bound to the path "srv.sock" (mode 0640), with a connection from
 *     this process waiting to be accepted;
 *   - a stream listener bound to an abstract name, with a pending connection too;
 *   - a datagram socket bound to "dg.sock" with 2 datagrams queued from a client connected
 *     to it;
 *   - a datagram socket bound to the relative name "rel.sock" (from its own directory) with a
 *     datagram queued, and one bound to "gone.sock" whose file was then removed;
 *   - with "--ext PATH": a datagram socket connected to PATH, a socket of the harness outside
 *     the dumped process, which sends "before" before the dump and "after" after restore;
 *   - with "--child": a child process with a connection to the path listener waiting to be
 *     accepted, and a stream socketpair shared with it holding bytes for the child; after
 *     restore the child reads them, sends "from child" on its connection and exits 0;
 *   - with "--inflight": a pipe's read end sent over a socketpair with SCM_RIGHTS and still
 *     queued there (dumped and restored with it); the check receives it and reads from it.
 * After SIGUSR2 (sent after the restore) it checks every queue byte for byte and datagram by
 * datagram, accepts both pending connections and talks through them, and checks the options.
 */
#include "workload.h"

#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#define A_TO_B 1500
#define B_TO_A 700

static unsigned char pattern(int seed, int i)
{
	return (unsigned char)(i * 13 + seed);
}

static int sock_or_die(int type)
{
	int fd = socket(AF_UNIX, type, 0);
	if (fd < 0)
		wl_die("socket");
	return fd;
}

static socklen_t path_addr(struct sockaddr_un *sa, const char *dir, const char *name)
{
	memset(sa, 0, sizeof *sa);
	sa->sun_family = AF_UNIX;
	snprintf(sa->sun_path, sizeof sa->sun_path, "%s/%s", dir, name);
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(sa->sun_path) + 1);
}

static socklen_t abstract_addr(struct sockaddr_un *sa)
{
	memset(sa, 0, sizeof *sa);
	sa->sun_family = AF_UNIX;
	int n = snprintf(sa->sun_path + 1, sizeof sa->sun_path - 1, "ckpt-unix-%d", (int)getpid());
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

static void send_all(int fd, const unsigned char *buf, size_t len)
{
	while (len) {
		ssize_t n = send(fd, buf, len, 0);
		if (n <= 0)
			wl_die("send");
		buf += n;
		len -= (size_t)n;
	}
}

/* The child of "--child": waits for its parent's word (SIGUSR2), checks, talks, exits. */
static __attribute__((noreturn)) void child_main(int listener_unused, int conn, int shared)
{
	(void)listener_unused;
	wl_wait_sleeping();
	char buf[64];
	ssize_t n = recv(shared, buf, sizeof buf, MSG_DONTWAIT);
	if (n != 9 || memcmp(buf, "for child", 9))
		_exit(3);
	if (send(conn, "from child", 10, 0) != 10)
		_exit(4);
	_exit(0);
}

static int has_flag(const char *name)
{
	for (int i = 0; i < wl_argc; i++)
		if (!strcmp(wl_argv[i], name))
			return 1;
	return 0;
}

static int int_opt(int fd, int name)
{
	int v = -1;
	socklen_t len = sizeof v;
	if (getsockopt(fd, SOL_SOCKET, name, &v, &len))
		return -1;
	return v;
}

/* Reads exactly LEN bytes queued in FD (non-blocking: what is not queued is missing). */
static void expect_stream(int fd, int seed, int len, const char *what)
{
	unsigned char buf[4096];
	int got = 0;
	while (got < len) {
		ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
		if (n <= 0) {
			wl_fail("%s: %d of %d bytes, then %zd (errno %d)", what, got, len, n, errno);
			return;
		}
		for (ssize_t i = 0; i < n; i++)
			if (buf[i] != pattern(seed, got + (int)i)) {
				wl_fail("%s: byte %d differs", what, got + (int)i);
				return;
			}
		got += (int)n;
	}
	if (recv(fd, buf, sizeof buf, MSG_DONTWAIT) != -1 || errno != EAGAIN)
		wl_fail("%s: more than %d bytes queued", what, len);
}

static void expect_packet(int fd, const char *want, const char *what)
{
	char buf[256];
	ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
	if (n != (ssize_t)strlen(want) || memcmp(buf, want, (size_t)n))
		wl_fail("%s: expected \"%s\", got %zd bytes (errno %d)", what, want, n, errno);
}

/* Accepts the waiting connection of LISTENER, then sends and answers through it. */
static void expect_pending(int listener, int client, const char *what)
{
	int acc = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
	if (acc < 0) {
		wl_fail("%s: accept: errno %d", what, errno);
		return;
	}
	if (send(client, "ping", 4, 0) != 4)
		wl_fail("%s: client send: errno %d", what, errno);
	struct timespec ts = { 0, 1000 * 1000 };
	nanosleep(&ts, NULL);
	expect_packet(acc, "ping", what);
	if (send(acc, "pong", 4, 0) != 4)
		wl_fail("%s: server send: errno %d", what, errno);
	expect_packet(client, "pong", what);
	close(acc);
}

/* The path listener of "--child" holds two pending connections, ours and the child's. The
 * images do not say which of the two came first (and socket inode numbers, handed out in
 * per-CPU batches, do not tell either), so restore may queue them in either order: accept
 * both, then tell them apart by who talks on them. */
static void expect_two_pending(int listener, int client, pid_t child, int cchild)
{
	int acc[2];
	for (int i = 0; i < 2; i++) {
		acc[i] = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
		if (acc[i] < 0) {
			wl_fail("path listener: accept %d of 2: errno %d", i + 1, errno);
			return;
		}
	}
	if (send(client, "ping", 4, 0) != 4)
		wl_fail("path listener: client send: errno %d", errno);
	/* A unix stream send queues on the peer before it returns: no wait needed. */
	char buf[64];
	ssize_t got[2];
	int err[2];
	for (int i = 0; i < 2; i++) {
		got[i] = recv(acc[i], buf, sizeof buf, MSG_DONTWAIT);
		err[i] = got[i] < 0 ? errno : 0;
	}
	int ours = got[0] == 4 ? 0 : 1;
	if (got[ours] != 4 || memcmp(buf, "ping", 4) || got[1 - ours] != -1 || err[1 - ours] != EAGAIN)
		wl_fail("path listener: the two accepted connections got %zd and %zd bytes, not \"ping\" and nothing",
			got[0], got[1]);
	if (send(acc[ours], "pong", 4, 0) != 4)
		wl_fail("path listener: server send: errno %d", errno);
	expect_packet(client, "pong", "path listener");

	kill(child, SIGUSR2);
	struct pollfd pfd = { .fd = acc[1 - ours], .events = POLLIN };
	if (poll(&pfd, 1, 10 * 1000) != 1)
		wl_fail("child's connection: nothing within 10 s");
	ssize_t n = recv(acc[1 - ours], buf, sizeof buf, MSG_DONTWAIT);
	if (n != 10 || memcmp(buf, "from child", 10))
		wl_fail("child's connection: got %zd bytes", n);
	int status = -1;
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status))
		wl_fail("child: status %#x", status);
	close(acc[0]);
	close(acc[1]);
	close(cchild);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[3900];
	wl_dir(dir, sizeof dir);
	unsigned char buf[A_TO_B];

	int sp[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp))
		wl_die("socketpair stream");
	int rcvbuf = 96 * 1024;
	if (setsockopt(sp[0], SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf))
		wl_die("SO_RCVBUF");
	int one = 1;
	if (setsockopt(sp[1], SOL_SOCKET, SO_PASSCRED, &one, sizeof one))
		wl_die("SO_PASSCRED");
	int rcvbuf_seen = int_opt(sp[0], SO_RCVBUF);
	for (int i = 0; i < A_TO_B; i++)
		buf[i] = pattern(1, i);
	send_all(sp[0], buf, A_TO_B);
	for (int i = 0; i < B_TO_A; i++)
		buf[i] = pattern(2, i);
	send_all(sp[1], buf, B_TO_A);
	if (fcntl(sp[1], F_SETFL, O_NONBLOCK))
		wl_die("O_NONBLOCK");

	int dp[2];
	if (socketpair(AF_UNIX, SOCK_DGRAM, 0, dp))
		wl_die("socketpair dgram");
	const char *grams[] = { "a", "bb", "ccc" };
	for (int i = 0; i < 3; i++)
		if (send(dp[0], grams[i], strlen(grams[i]), 0) < 0)
			wl_die("send dgram");

	int qp[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, qp))
		wl_die("socketpair seqpacket");
	if (send(qp[1], "rec1", 4, 0) != 4 || send(qp[1], "record2", 7, 0) != 7)
		wl_die("send seqpacket");
	if (shutdown(qp[1], SHUT_WR))
		wl_die("shutdown");

	struct sockaddr_un sa;
	int lpath = sock_or_die(SOCK_STREAM);
	socklen_t len = path_addr(&sa, dir, "srv.sock");
	if (bind(lpath, (struct sockaddr *)&sa, len) || listen(lpath, 4))
		wl_die("bind/listen srv.sock");
	if (chmod(sa.sun_path, 0640))
		wl_die("chmod srv.sock");
	int cpath = sock_or_die(SOCK_STREAM);
	if (connect(cpath, (struct sockaddr *)&sa, len))
		wl_die("connect srv.sock");

	int labs = sock_or_die(SOCK_STREAM);
	len = abstract_addr(&sa);
	if (bind(labs, (struct sockaddr *)&sa, len) || listen(labs, 3))
		wl_die("bind/listen abstract");
	int cabs = sock_or_die(SOCK_STREAM);
	if (connect(cabs, (struct sockaddr *)&sa, len))
		wl_die("connect abstract");

	int dsrv = sock_or_die(SOCK_DGRAM);
	len = path_addr(&sa, dir, "dg.sock");
	if (bind(dsrv, (struct sockaddr *)&sa, len))
		wl_die("bind dg.sock");
	int dcli = sock_or_die(SOCK_DGRAM);
	if (connect(dcli, (struct sockaddr *)&sa, len))
		wl_die("connect dg.sock");
	if (send(dcli, "first", 5, 0) != 5 || send(dcli, "second!", 7, 0) != 7)
		wl_die("send dg.sock");

	int drel = sock_or_die(SOCK_DGRAM);
	memset(&sa, 0, sizeof sa);
	sa.sun_family = AF_UNIX;
	strcpy(sa.sun_path, "rel.sock");
	if (chdir(dir) || bind(drel, (struct sockaddr *)&sa, sizeof sa))
		wl_die("bind rel.sock");
	if (sendto(dsrv, "rel", 3, 0, (struct sockaddr *)&sa, sizeof sa) != 3)
		wl_die("send to rel.sock");
	int dgone = sock_or_die(SOCK_DGRAM);
	len = path_addr(&sa, dir, "gone.sock");
	if (bind(dgone, (struct sockaddr *)&sa, len) || unlink(sa.sun_path))
		wl_die("bind and unlink gone.sock");

	pid_t child = -1;
	int cchild = -1;
	if (has_flag("--child")) {
		int shared[2];
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, shared))
			wl_die("socketpair shared");
		if (send(shared[0], "for child", 9, 0) != 9)
			wl_die("send for child");
		len = path_addr(&sa, dir, "srv.sock");
		child = fork();
		if (child < 0)
			wl_die("fork");
		if (child == 0) {
			close(shared[0]);
			int c = sock_or_die(SOCK_STREAM);
			if (connect(c, (struct sockaddr *)&sa, len) || send(shared[1], "c", 1, 0) != 1)
				_exit(5);
			child_main(lpath, c, shared[1]);
		}
		close(shared[1]);
		cchild = shared[0];
		/* Ready only once the child's connection waits on the listener. */
		char c;
		if (recv(cchild, &c, 1, 0) != 1)
			wl_die("the child did not connect");
	}

	int inflight[2] = { -1, -1 };
	if (has_flag("--inflight")) {
		int p[2];
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, inflight) || pipe(p) || write(p[1], "via fd", 6) != 6)
			wl_die("in-flight setup");
		char cbuf[CMSG_SPACE(sizeof(int))];
		memset(cbuf, 0, sizeof cbuf);
		struct iovec iov = { .iov_base = "f", .iov_len = 1 };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &p[0], sizeof(int));
		if (sendmsg(inflight[0], &mh, 0) != 1)
			wl_die("sendmsg SCM_RIGHTS");
		close(p[0]);
		close(p[1]);
	}

	const char *ext = wl_opt("--ext", NULL);
	int dext = -1;
	if (ext) {
		dext = sock_or_die(SOCK_DGRAM);
		memset(&sa, 0, sizeof sa);
		sa.sun_family = AF_UNIX;
		snprintf(sa.sun_path, sizeof sa.sun_path, "%s", ext);
		if (connect(dext, (struct sockaddr *)&sa, sizeof sa) || send(dext, "before", 6, 0) != 6)
			wl_die("connect/send to the outside socket");
	}

	wl_ready();
	wl_wait_sleeping();

	expect_stream(sp[1], 1, A_TO_B, "stream pair, 0 to 1");
	expect_stream(sp[0], 2, B_TO_A, "stream pair, 1 to 0");
	if (int_opt(sp[0], SO_RCVBUF) != rcvbuf_seen)
		wl_fail("SO_RCVBUF %d, was %d", int_opt(sp[0], SO_RCVBUF), rcvbuf_seen);
	if (int_opt(sp[1], SO_PASSCRED) != 1)
		wl_fail("SO_PASSCRED lost");
	if (!(fcntl(sp[1], F_GETFL) & O_NONBLOCK))
		wl_fail("O_NONBLOCK lost");
	send_all(sp[0], (const unsigned char *)"x", 1);
	expect_packet(sp[1], "x", "stream pair after restore");

	for (int i = 0; i < 3; i++)
		expect_packet(dp[1], grams[i], "dgram pair");
	if (recv(dp[1], buf, sizeof buf, MSG_DONTWAIT) != -1)
		wl_fail("dgram pair: a 4th datagram");

	expect_packet(qp[0], "rec1", "seqpacket pair");
	expect_packet(qp[0], "record2", "seqpacket pair");
	if (recv(qp[0], buf, sizeof buf, MSG_DONTWAIT) != 0)
		wl_fail("seqpacket pair: no end of file after the sender's shutdown");
	if (send(qp[1], "late", 4, MSG_NOSIGNAL) != -1 || errno != EPIPE)
		wl_fail("seqpacket pair: the shut down side could still send");

	if (child > 0)
		expect_two_pending(lpath, cpath, child, cchild);
	else
		expect_pending(lpath, cpath, "path listener");
	expect_pending(labs, cabs, "abstract listener");
	struct stat st;
	path_addr(&sa, dir, "srv.sock");
	if (stat(sa.sun_path, &st) || !S_ISSOCK(st.st_mode) || (st.st_mode & 0777) != 0640)
		wl_fail("srv.sock: missing or mode %o", (unsigned)st.st_mode);

	expect_packet(dsrv, "first", "named dgram");
	expect_packet(dsrv, "second!", "named dgram");
	if (send(dcli, "third", 5, 0) != 5)
		wl_fail("named dgram: the client is no longer connected (errno %d)", errno);
	expect_packet(dsrv, "third", "named dgram after restore");

	expect_packet(drel, "rel", "relative name");
	socklen_t alen = sizeof sa;
	if (getsockname(drel, (struct sockaddr *)&sa, &alen) || strcmp(sa.sun_path, "rel.sock"))
		wl_fail("relative name: bound to \"%s\"", sa.sun_path);
	alen = sizeof sa;
	path_addr(&sa, dir, "gone.sock");
	if (access(sa.sun_path, F_OK) == 0)
		wl_fail("gone.sock exists again");
	char want[sizeof sa.sun_path];
	snprintf(want, sizeof want, "%s", sa.sun_path);
	if (getsockname(dgone, (struct sockaddr *)&sa, &alen) || strcmp(sa.sun_path, want))
		wl_fail("removed name: bound to \"%s\"", sa.sun_path);

	if (inflight[1] >= 0) {
		char cbuf[CMSG_SPACE(sizeof(int))], one;
		struct iovec iov = { .iov_base = &one, .iov_len = 1 };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
		struct cmsghdr *cm = recvmsg(inflight[1], &mh, MSG_DONTWAIT) == 1 ? CMSG_FIRSTHDR(&mh) : NULL;
		int got = -1;
		if (cm && cm->cmsg_type == SCM_RIGHTS)
			memcpy(&got, CMSG_DATA(cm), sizeof got);
		char pbuf[16];
		if (got < 0 || read(got, pbuf, sizeof pbuf) != 6 || memcmp(pbuf, "via fd", 6))
			wl_fail("in-flight fd: not received, or its pipe lost its bytes");
	}

	if (ext && send(dext, "after", 5, 0) != 5)
		wl_fail("outside socket: send after restore: errno %d", errno);

	wl_finish();
}
