/* A process tree that checks itself after restore: links, sessions, groups, zombies, a stopped
 * child, a thread in a grandchild, a pipe with bytes in it between two processes, an inherited
 * fd with its shared offset, and a child sharing the root's fd table (CLONE_FILES).
 *
 *   root R (setsid: leads its session and group)
 *   +- A   setpgid(0, 0): leads a group; reads the bytes R left in a pipe; shares R's file offset
 *   |  +- G   in A's group, cwd in a subdirectory, with a second thread counting
 *   +- S   setsid: leads its own session
 *   +- J   joins A's group
 *   +- C   clone(CLONE_FILES): opens fd 50 after restore, R must see it
 *   +- T   stopped (SIGSTOP) at dump time; exits 3 once continued
 *   +- Z   zombie, exited with status 7
 *   +- K   zombie, killed by SIGTERM
 *
 * The ready file lists every pid (name=pid), for the test to check none is left behind after a
 * failed restore. After SIGUSR2, R tells the live children to check themselves (one byte each on
 * a shared pipe); each writes one fixed-size report to R, then exits; R collects, reaps and
 * checks the zombies' statuses.
 */
#include "workload.h"

#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define REPORT 128
#define PIPE_BYTES 5000
#define OFFSET 100

static int go_r, go_w;         /* R -> children: one byte each means "check yourself now" */
static int rep_r, rep_w;       /* children -> R: fixed-size reports */
static int data_r, data_w;     /* R -> A: PIPE_BYTES left unread at dump time */
static int file_fd;            /* shared description, offset OFFSET at dump time */
static pid_t root, a_pid;

static void report(const char *name, const char *text)
{
	char msg[REPORT];
	memset(msg, 0, sizeof msg);
	snprintf(msg, sizeof msg, "%s:%s", name, text);
	if (write(rep_w, msg, sizeof msg) != (ssize_t)sizeof msg)
		_exit(2);
}

static void wait_go(void)
{
	char byte;
	for (;;) {
		ssize_t n = read(go_r, &byte, 1);
		if (n == 1)
			return;
		if (n < 0 && errno == EINTR)
			continue;
		_exit(2);
	}
}

/* Appends "what" to buf when cond is false. */
static void check(char *buf, size_t size, int cond, const char *fmt, long a, long b)
{
	if (cond)
		return;
	size_t len = strlen(buf);
	if (len)
		snprintf(buf + len, size - len, ", ");
	len = strlen(buf);
	snprintf(buf + len, size - len, fmt, a, b);
}

static void verdict(const char *name, const char *fails)
{
	report(name, fails[0] ? fails : "PASS");
}

static volatile long counted;

static void *counter(void *arg)
{
	(void)arg;
	for (;;) {
		counted++;
		struct timespec ts = { 0, 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	return NULL;
}

static void grandchild(void)
{
	if (chdir("gdir"))
		_exit(2);
	pthread_t t;
	if (pthread_create(&t, NULL, counter, NULL))
		_exit(2);
	report("G", "up");
	wait_go();
	char fails[REPORT - 8] = "";
	check(fails, sizeof fails, getppid() == a_pid, "ppid %ld, not %ld", getppid(), a_pid);
	check(fails, sizeof fails, getpgid(0) == a_pid, "pgid %ld, not %ld", getpgid(0), a_pid);
	check(fails, sizeof fails, getsid(0) == root, "sid %ld, not %ld", getsid(0), root);
	char cwd[256] = "";
	check(fails, sizeof fails, getcwd(cwd, sizeof cwd) && strstr(cwd, "/gdir"), "cwd lost%ld%ld", 0, 0);
	long before = counted;
	struct timespec ts = { 0, 30 * 1000 * 1000 };
	nanosleep(&ts, NULL);
	check(fails, sizeof fails, counted > before, "thread stopped at %ld (%ld)", counted, before);
	verdict("G", fails);
	_exit(0);
}

static void child_a(void)
{
	if (setpgid(0, 0))
		_exit(2);
	a_pid = getpid();
	close(data_w);
	pid_t g = fork();
	if (g < 0)
		_exit(2);
	if (g == 0)
		grandchild();
	char up[32];
	snprintf(up, sizeof up, "up %d", g);
	report("A", up);
	wait_go();
	char fails[REPORT - 8] = "";
	check(fails, sizeof fails, getppid() == root, "ppid %ld, not %ld", getppid(), root);
	check(fails, sizeof fails, getpgid(0) == getpid(), "pgid %ld, not %ld", getpgid(0), getpid());
	check(fails, sizeof fails, getsid(0) == root, "sid %ld, not %ld", getsid(0), root);
	/* The bytes R left in the pipe, exactly, and nothing more. */
	static unsigned char buf[PIPE_BYTES + 16];
	size_t got = 0;
	while (got < PIPE_BYTES) {
		ssize_t n = read(data_r, buf + got, PIPE_BYTES - got);
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	check(fails, sizeof fails, got == PIPE_BYTES, "pipe gave %ld of %ld bytes", (long)got, PIPE_BYTES);
	int bad = 0;
	for (size_t i = 0; i < got; i++)
		bad |= buf[i] != (unsigned char)(i * 7 + 3);
	check(fails, sizeof fails, !bad, "pipe bytes differ%ld%ld", 0, 0);
	fcntl(data_r, F_SETFL, O_NONBLOCK);
	check(fails, sizeof fails, read(data_r, buf, 16) < 0 && errno == EAGAIN, "pipe has more bytes%ld%ld", 0, 0);
	/* The inherited description: its offset is R's too. */
	off_t at = lseek(file_fd, 0, SEEK_CUR);
	check(fails, sizeof fails, at == OFFSET, "file offset %ld, not %ld", (long)at, OFFSET);
	char ten[10];
	check(fails, sizeof fails, read(file_fd, ten, 10) == 10, "read of the shared file%ld%ld", 0, 0);
	int status = 0;
	check(fails, sizeof fails, waitpid(g, &status, 0) == g && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "grandchild ended with %ld (%ld)", (long)status, (long)g);
	verdict("A", fails);
	_exit(0);
}

static void child_s(void)
{
	if (setsid() < 0)
		_exit(2);
	report("S", "up");
	wait_go();
	char fails[REPORT - 8] = "";
	check(fails, sizeof fails, getsid(0) == getpid(), "sid %ld, not %ld", getsid(0), getpid());
	check(fails, sizeof fails, getpgid(0) == getpid(), "pgid %ld, not %ld", getpgid(0), getpid());
	check(fails, sizeof fails, getppid() == root, "ppid %ld, not %ld", getppid(), root);
	verdict("S", fails);
	_exit(0);
}

static void child_j(void)
{
	if (setpgid(0, a_pid))
		_exit(2);
	report("J", "up");
	wait_go();
	char fails[REPORT - 8] = "";
	check(fails, sizeof fails, getpgid(0) == a_pid, "pgid %ld, not %ld", getpgid(0), a_pid);
	check(fails, sizeof fails, getsid(0) == root, "sid %ld, not %ld", getsid(0), root);
	check(fails, sizeof fails, getppid() == root, "ppid %ld, not %ld", getppid(), root);
	verdict("J", fails);
	_exit(0);
}

static int child_c(void *arg)
{
	(void)arg;
	report("C", "up");
	wait_go();
	char fails[REPORT - 8] = "";
	check(fails, sizeof fails, getppid() == root, "ppid %ld, not %ld", getppid(), root);
	int fd = open("/dev/null", O_RDONLY);
	check(fails, sizeof fails, fd >= 0 && dup2(fd, 50) == 50, "open fd 50: %ld %ld", fd, errno);
	verdict("C", fails);
	_exit(0);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	if (setsid() < 0)
		wl_die("setsid");
	root = getpid();
	int p[2];
	if (pipe(p))
		wl_die("pipe");
	go_r = p[0], go_w = p[1];
	if (pipe(p))
		wl_die("pipe");
	rep_r = p[0], rep_w = p[1];
	if (pipe(p))
		wl_die("pipe");
	data_r = p[0], data_w = p[1];
	char dir[4096], path[4200];
	wl_dir(dir, sizeof dir);
	snprintf(path, sizeof path, "%s/gdir", dir);
	if (mkdir(path, 0755) && errno != EEXIST)
		wl_die("mkdir gdir");
	snprintf(path, sizeof path, "%s/shared.bin", dir);
	file_fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (file_fd < 0)
		wl_die("open shared.bin");
	static char block[4096];
	memset(block, 'x', sizeof block);
	if (write(file_fd, block, sizeof block) != (ssize_t)sizeof block || lseek(file_fd, OFFSET, SEEK_SET) != OFFSET)
		wl_die("fill shared.bin");

	a_pid = fork();
	if (a_pid == 0)
		child_a();
	/* Both sides set A's group: J, forked next, must find it. */
	if (a_pid > 0 && setpgid(a_pid, a_pid) && errno != EACCES)
		wl_die("setpgid A");
	close(data_r);
	pid_t s = fork();
	if (s == 0)
		child_s();
	pid_t j = fork();
	if (j == 0)
		child_j();
	static char stack[64 * 1024] __attribute__((aligned(16)));
	pid_t c = clone(child_c, stack + sizeof stack, CLONE_FILES | SIGCHLD, NULL);
	pid_t t = fork();
	if (t == 0) {
		raise(SIGSTOP);
		_exit(3);
	}
	pid_t z = fork();
	if (z == 0)
		_exit(7);
	pid_t k = fork();
	if (k == 0) {
		raise(SIGTERM);
		_exit(2);
	}
	if (a_pid < 0 || s < 0 || j < 0 || c < 0 || t < 0 || z < 0 || k < 0)
		wl_die("fork");
	static unsigned char bytes[PIPE_BYTES];
	for (size_t i = 0; i < PIPE_BYTES; i++)
		bytes[i] = (unsigned char)(i * 7 + 3);
	if (write(data_w, bytes, PIPE_BYTES) != PIPE_BYTES)
		wl_die("fill the pipe");
	/* Everyone up: the live ones said so, the zombies are dead (not reaped), T is stopped. */
	char msg[REPORT];
	int g = 0;
	for (int up = 0; up < 5; up++) {
		if (read(rep_r, msg, REPORT) != REPORT)
			wl_die("wait for the children");
		if (!strncmp(msg, "A:up ", 5))
			g = atoi(msg + 5);
	}
	siginfo_t si;
	if (waitid(P_PID, (id_t)z, &si, WEXITED | WNOWAIT) || waitid(P_PID, (id_t)k, &si, WEXITED | WNOWAIT))
		wl_die("wait for the zombies");
	int st;
	if (waitpid(t, &st, WUNTRACED) != t || !WIFSTOPPED(st))
		wl_die("wait for the stop");
	char ready[512];
	snprintf(ready, sizeof ready, "R=%d A=%d G=%d S=%d J=%d C=%d T=%d Z=%d K=%d\n", root, a_pid, g, s, j, c, t, z,
		 k);
	wl_ready_with(ready);

	wl_wait_sleeping();
	alarm(20);
	/* Stopped again (a fresh stop that we are told of: through wait, not /proc, whose pids
	 * are not ours in a new pid namespace), and the zombies still there to be collected. */
	int stopped = 0;
	for (int tries = 0; tries < 400 && !stopped; tries++) {
		memset(&si, 0, sizeof si);
		if (!waitid(P_PID, (id_t)t, &si, WSTOPPED | WNOHANG | WNOWAIT) && si.si_pid == t &&
		    si.si_code == CLD_STOPPED)
			stopped = 1;
		else
			usleep(5000);
	}
	if (!stopped)
		wl_fail("T is not stopped");
	int status;
	if (waitpid(z, &status, WNOHANG) != z || !WIFEXITED(status) || WEXITSTATUS(status) != 7)
		wl_fail("zombie Z: status %#x", status);
	status = 0;
	if (waitpid(k, &status, WNOHANG) != k || !WIFSIGNALED(status) || WTERMSIG(status) != SIGTERM)
		wl_fail("zombie K: status %#x", status);
	kill(t, SIGCONT);
	if (write(go_w, "ggggg", 5) != 5)
		wl_fail("go: %s", strerror(errno));
	for (int n = 0; n < 5; n++) {
		if (read(rep_r, msg, REPORT) != REPORT) {
			wl_fail("report %d: %s", n, strerror(errno));
			break;
		}
		msg[REPORT - 1] = 0;
		if (!strstr(msg, ":PASS"))
			wl_fail("%s", msg);
	}
	/* C opened fd 50 in the fd table we share. */
	if (fcntl(50, F_GETFD) < 0)
		wl_fail("fd 50 that C opened is not ours");
	/* A read 10 bytes through the description we share. */
	off_t at = lseek(file_fd, 0, SEEK_CUR);
	if (at != OFFSET + 10)
		wl_fail("file offset %ld after A read 10 from %d", (long)at, OFFSET);
	pid_t kids[] = { a_pid, s, j, c, t };
	int want[] = { 0, 0, 0, 0, 3 };
	for (int i = 0; i < 5; i++) {
		status = 0;
		if (waitpid(kids[i], &status, __WALL) != kids[i] || !WIFEXITED(status) || WEXITSTATUS(status) != want[i])
			wl_fail("child %d ended with %#x", kids[i], status);
	}
	wl_finish();
}
