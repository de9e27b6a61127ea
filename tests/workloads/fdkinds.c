/* One open file of a kind beyond plain regular files (--kind pipe|socketpair|eventfd|epoll|
 * timerfd|signalfd|inotify|directory|opath|memfd), at fd 42, holding state that a careless dumper would consume or change:
 * queued pipe and socket data, an eventfd count, an epoll registration, an armed timerfd, a
 * signalfd mask. The check reads all of it back. Whether the dump supports the kind or refuses
 * it, the process must come through unchanged. */
#include "workload.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>

#define FD 42

static int other = -1; /* the second end, or the fd an epoll/inotify watches */
static struct stat st_before;

static void place(int fd)
{
	if (fd < 0)
		wl_die("create the fd");
	if (fd != FD) {
		if (dup2(fd, FD) < 0)
			wl_die("dup2");
		close(fd);
	}
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	const char *kind = wl_opt("--kind", "pipe");
	static const char msg[] = "queued bytes";
	if (!strcmp(kind, "pipe")) {
		int p[2];
		if (pipe(p))
			wl_die("pipe");
		place(p[0]);
		other = p[1];
		if (write(other, msg, sizeof msg) != sizeof msg)
			wl_die("write pipe");
	} else if (!strcmp(kind, "socketpair")) {
		int s[2];
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, s))
			wl_die("socketpair");
		place(s[0]);
		other = s[1];
		if (write(other, msg, sizeof msg) != sizeof msg)
			wl_die("write socket");
	} else if (!strcmp(kind, "eventfd")) {
		place(eventfd(7, EFD_NONBLOCK));
	} else if (!strcmp(kind, "epoll")) {
		int efd = eventfd(1, EFD_NONBLOCK);
		place(epoll_create1(0));
		other = efd;
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 0xabcdef };
		if (epoll_ctl(FD, EPOLL_CTL_ADD, other, &ev))
			wl_die("epoll_ctl");
	} else if (!strcmp(kind, "timerfd")) {
		place(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK));
		struct itimerspec its = { .it_value = { 100, 0 }, .it_interval = { 100, 0 } };
		if (timerfd_settime(FD, 0, &its, NULL))
			wl_die("timerfd_settime");
	} else if (!strcmp(kind, "signalfd")) {
		sigset_t set;
		sigemptyset(&set);
		sigaddset(&set, SIGURG);
		sigprocmask(SIG_BLOCK, &set, NULL);
		place(signalfd(-1, &set, SFD_NONBLOCK));
		raise(SIGURG);
	} else if (!strcmp(kind, "inotify")) {
		char dir[4096], watched[4200];
		wl_dir(dir, sizeof dir);
		snprintf(watched, sizeof watched, "%s/watched", dir);
		if (mkdir(watched, 0700))
			wl_die("mkdir watched");
		place(inotify_init1(IN_NONBLOCK));
		if (inotify_add_watch(FD, watched, IN_CREATE) < 0)
			wl_die("inotify_add_watch");
	} else if (!strcmp(kind, "directory")) {
		char dir[4096];
		wl_dir(dir, sizeof dir);
		place(open(dir, O_RDONLY | O_DIRECTORY));
	} else if (!strcmp(kind, "opath")) {
		char dir[4096], path[4200];
		wl_dir(dir, sizeof dir);
		snprintf(path, sizeof path, "%s/opath-target", dir);
		close(open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
		place(open(path, O_PATH));
	} else if (!strcmp(kind, "memfd")) {
		place(memfd_create("ckpt-memfd", 0));
		if (ftruncate(FD, 8192) || pwrite(FD, msg, sizeof msg, 4096) != sizeof msg)
			wl_die("fill the memfd");
		lseek(FD, 100, SEEK_SET);
	} else {
		fprintf(stderr, "unknown --kind %s\n", kind);
		return 2;
	}
	fstat(FD, &st_before);
	wl_ready();
	wl_wait_sleeping();

	if (fcntl(FD, F_GETFD) < 0) {
		wl_fail("fd %d is gone", FD);
		wl_finish();
	}
	if (!strcmp(kind, "pipe") || !strcmp(kind, "socketpair")) {
		int queued = -1;
		char buf[64] = { 0 };
		ioctl(FD, FIONREAD, &queued);
		if (queued != (int)sizeof msg)
			wl_fail("%d bytes queued, expected %zu", queued, sizeof msg);
		else if (read(FD, buf, sizeof buf) != (ssize_t)sizeof msg || memcmp(buf, msg, sizeof msg))
			wl_fail("the queued bytes changed");
		if (write(other, "x", 1) != 1 || read(FD, buf, 1) != 1 || buf[0] != 'x')
			wl_fail("the two ends are no longer connected");
	} else if (!strcmp(kind, "eventfd")) {
		uint64_t v = 0;
		if (read(FD, &v, sizeof v) != sizeof v || v != 7)
			wl_fail("eventfd count %llu, expected 7", (unsigned long long)v);
	} else if (!strcmp(kind, "epoll")) {
		struct epoll_event ev;
		int n = epoll_wait(FD, &ev, 1, 0);
		if (n != 1 || ev.data.u64 != 0xabcdef)
			wl_fail("epoll reports %d events (data %#llx)", n, n == 1 ? (unsigned long long)ev.data.u64 : 0ULL);
	} else if (!strcmp(kind, "timerfd")) {
		struct itimerspec its;
		if (timerfd_gettime(FD, &its) || its.it_interval.tv_sec != 100 || its.it_value.tv_sec > 100 ||
		    its.it_value.tv_sec < 40)
			wl_fail("timerfd: %lld s left, interval %lld s", (long long)its.it_value.tv_sec,
				(long long)its.it_interval.tv_sec);
	} else if (!strcmp(kind, "signalfd")) {
		struct signalfd_siginfo si;
		if (read(FD, &si, sizeof si) != sizeof si || si.ssi_signo != SIGURG)
			wl_fail("signalfd does not deliver the pending SIGURG");
	} else if (!strcmp(kind, "directory") || !strcmp(kind, "opath")) {
		struct stat st;
		if (fstat(FD, &st) || st.st_ino != st_before.st_ino || st.st_dev != st_before.st_dev)
			wl_fail("fd %d refers to another file", FD);
		int want = !strcmp(kind, "opath") ? O_PATH : O_DIRECTORY;
		if (!(fcntl(FD, F_GETFL) & want))
			wl_fail("fd %d lost its %s flag", FD, kind);
		if (!strcmp(kind, "directory") && openat(FD, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC) < 0)
			wl_fail("openat relative to the directory fd: %s", strerror(errno));
	} else if (!strcmp(kind, "memfd")) {
		char buf[sizeof msg];
		struct stat st;
		if (fstat(FD, &st) || st.st_size != 8192)
			wl_fail("memfd size %lld, expected 8192", (long long)st.st_size);
		if (pread(FD, buf, sizeof buf, 4096) != sizeof buf || memcmp(buf, msg, sizeof msg))
			wl_fail("memfd contents changed");
		if (lseek(FD, 0, SEEK_CUR) != 100)
			wl_fail("memfd offset %lld, expected 100", (long long)lseek(FD, 0, SEEK_CUR));
	} else if (!strcmp(kind, "inotify")) {
		char dir[4096], path[4200], buf[4096];
		wl_dir(dir, sizeof dir);
		snprintf(path, sizeof path, "%s/watched/probe", dir);
		if (read(FD, buf, sizeof buf) > 0)
			wl_fail("inotify reports events nothing caused");
		close(open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
		if (read(FD, buf, sizeof buf) <= 0)
			wl_fail("inotify reports nothing for a file created in the watched directory");
	}
	wl_finish();
}
