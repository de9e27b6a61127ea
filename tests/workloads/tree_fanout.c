/* A wide process tree holding many open files, for the tree dump benchmark:
 *
 *   tree_fanout --ready F --result F [--procs 100] [--fds 100] [--fanout 10] [--inherit 10]
 *               [--sockets 0|1]
 *
 * Process i (the root is 0) forks processes i*fanout+1 .. i*fanout+fanout (those below --procs),
 * so 100 processes at fanout 10 make a root, 10 children and 89 grandchildren. Before forking,
 * the root opens --inherit descriptors that every process then shares (one open file description
 * held by 100 processes). Each process then opens its own until it holds --fds descriptors: a
 * cycle of a regular file, a pipe (both ends), an eventfd and, with --sockets 1, a unix
 * socketpair (both ends).
 *
 * After SIGUSR2 the root checks that its descriptors are all still open and of the kind it
 * opened, then asks its children to do the same (SIGTERM): each checks its own, passes the
 * request on to its children, reaps them and exits 0 only if it and everything below it are
 * intact. The root writes PASS when every child exited 0. Children die with their parent
 * (PR_SET_PDEATHSIG) so that a killed root leaves nothing running. */
#include "workload.h"

#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define MAX_FDS 4096
#define MAX_KIDS 64

enum kind { K_NONE, K_FILE, K_PIPE, K_EVENTFD, K_SOCKET };

static enum kind kinds[MAX_FDS];
static int nfds;
static pid_t kids[MAX_KIDS];
static int nkids;

static void note(int fd, enum kind k)
{
	if (fd < 0)
		wl_die("open a descriptor");
	if (fd >= MAX_FDS)
		wl_die("descriptor number too high");
	kinds[fd] = k;
	nfds++;
}

/* Opens one more object, of the kind due at step STEP. */
static void open_one(const char *file, long step, int sockets)
{
	int cycle = sockets ? 4 : 3;
	int p[2];
	switch (step % cycle) {
	case 0:
		note(open(file, O_RDONLY), K_FILE);
		break;
	case 1:
		if (pipe(p))
			wl_die("pipe");
		note(p[0], K_PIPE);
		note(p[1], K_PIPE);
		break;
	case 2:
		note(eventfd((unsigned)step, EFD_NONBLOCK), K_EVENTFD);
		break;
	default:
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, p))
			wl_die("socketpair");
		note(p[0], K_SOCKET);
		note(p[1], K_SOCKET);
		break;
	}
}

/* Opens descriptors until the process holds WANT of them (a pair may overshoot by one). */
static void fill(const char *file, long want, int sockets)
{
	for (long step = 0; nfds < want; step++)
		open_one(file, step, sockets);
}

static int kind_matches(int fd, enum kind k)
{
	struct stat st;
	if (fstat(fd, &st))
		return 0;
	switch (k) {
	case K_FILE:
		return S_ISREG(st.st_mode);
	case K_PIPE:
		return S_ISFIFO(st.st_mode);
	case K_SOCKET:
		return S_ISSOCK(st.st_mode);
	case K_EVENTFD: {
		char link[64], target[64];
		snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
		ssize_t n = readlink(link, target, sizeof target - 1);
		if (n < 0)
			return 0;
		target[n] = 0;
		return !strcmp(target, "anon_inode:[eventfd]");
	}
	default:
		return 1;
	}
}

/* Counts the descriptors that are missing or of another kind than opened. */
static int check_fds(void)
{
	int bad = 0;
	for (int fd = 3; fd < MAX_FDS; fd++)
		if (kinds[fd] != K_NONE && !kind_matches(fd, kinds[fd]))
			bad++;
	return bad;
}

/* Asks every child to check itself and stop; counts those that did not exit 0. */
static int stop_children(void)
{
	int failed = 0;
	for (int i = 0; i < nkids; i++)
		if (kill(kids[i], SIGTERM))
			failed++;
	for (int i = 0; i < nkids; i++) {
		int status;
		while (waitpid(kids[i], &status, 0) < 0)
			if (errno != EINTR) {
				status = -1;
				break;
			}
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
			failed++;
	}
	return failed;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	long procs = wl_opt_long("--procs", 100);
	long want = wl_opt_long("--fds", 100);
	long fanout = wl_opt_long("--fanout", 10);
	long inherit = wl_opt_long("--inherit", 10);
	int sockets = (int)wl_opt_long("--sockets", 0);
	if (procs < 1 || fanout < 1 || fanout > MAX_KIDS || want > MAX_FDS - 8 || inherit > want) {
		fprintf(stderr, "bad --procs/--fanout/--fds/--inherit\n");
		return 2;
	}
	char dir[4096], file[4200];
	wl_dir(dir, sizeof dir);
	snprintf(file, sizeof file, "%s/tree-file", dir);
	int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, "contents\n", 9) != 9)
		wl_die("create the shared file");
	close(fd);

	nfds = 3;
	fill(file, 3 + inherit, sockets);

	/* Every process writes one byte here once it is set up; the root waits for all of them. */
	int ready[2];
	if (pipe(ready))
		wl_die("ready pipe");
	sigset_t term;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	if (sigprocmask(SIG_BLOCK, &term, NULL))
		wl_die("block SIGTERM");

	long me = 0;
	for (long c = 1; c <= fanout; c++) {
		long child = me * fanout + c;
		if (child >= procs)
			break;
		pid_t parent = getpid();
		pid_t pid = fork();
		if (pid < 0)
			wl_die("fork");
		if (pid == 0) {
			if (prctl(PR_SET_PDEATHSIG, SIGKILL) || getppid() != parent)
				_exit(3);
			me = child;
			nkids = 0;
			c = 0; /* the loop goes on with this process's own children */
			continue;
		}
		kids[nkids++] = pid;
	}
	if (me != 0) {
		close(ready[0]);
		fill(file, want, sockets); /* the ready pipe's write end is closed below */
		if (write(ready[1], "r", 1) != 1)
			_exit(4);
		close(ready[1]);
		int sig;
		while (sigwait(&term, &sig))
			;
		int bad = check_fds() + stop_children();
		_exit(bad ? 1 : 0);
	}

	close(ready[1]);
	fill(file, want, sockets); /* the ready pipe's read end is closed below */
	for (long got = 0; got < procs - 1;) {
		char buf[256];
		ssize_t n = read(ready[0], buf, sizeof buf);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			wl_die("a process of the tree died while setting up");
		got += n;
	}
	close(ready[0]);
	char text[128];
	snprintf(text, sizeof text, "ready procs=%ld fds=%ld\n", procs, want);
	wl_ready_with(text);
	wl_wait_sleeping();

	int bad = check_fds();
	if (bad)
		wl_fail("%d descriptors of the root are missing or changed kind", bad);
	int failed = stop_children();
	if (failed)
		wl_fail("%d subtrees of the root report a problem (or died)", failed);
	wl_finish();
}
