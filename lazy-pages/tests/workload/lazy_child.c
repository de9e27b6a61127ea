/* A stand-in for a lazily restored process, which is also its own restorer: it maps its
 * regions at fixed addresses, creates a userfaultfd (non-cooperative events, faults from
 * kernel mode too), registers the regions for missing faults, hands the fd to the daemon
 * with the hand-off protocol, closes its own copy, then exercises its memory and checks
 * every byte against the pattern the test wrote into the images.
 *
 * usage: lazy_child SOCKET MODE IMAGE_PID
 * modes: basic fork mm threads background early_exit external split
 * exit 0 when every check passed; prints what differed otherwise. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define PG 4096UL
#define A_ADDR 0x500000000000UL /* 256 pages, all lazy */
#define A_PAGES 256UL
#define B_ADDR 0x500010000000UL /* 16 pages, the first 8 lazy, the rest never written */
#define B_PAGES 16UL
#define B_LAZY 8UL
#define C_ADDR 0x500020000000UL /* where mode mm moves part of A */
#define D_ADDR 0x500030000000UL /* 1 page present but not lazy: not the daemon's to fill */

static int sock;
static long failures;

static uint64_t pattern(uint64_t image_addr) { return image_addr * 0x9E3779B97F4A7C15ULL; }

static void die(const char *what)
{
	fprintf(stderr, "lazy_child: %s: %s\n", what, strerror(errno));
	_exit(2);
}

static void expect_pattern(uint64_t live, uint64_t image, unsigned long pages, const char *what)
{
	for (unsigned long o = 0; o < pages * PG; o += 8) {
		uint64_t got = *(volatile uint64_t *)(live + o);
		if (got != pattern(image + o)) {
			if (failures++ < 5)
				fprintf(stderr, "lazy_child: %s: at %#lx got %#lx want %#lx\n", what, (unsigned long)(live + o),
					(unsigned long)got, (unsigned long)pattern(image + o));
		}
	}
}

static void expect_zero(uint64_t live, unsigned long pages, const char *what)
{
	for (unsigned long o = 0; o < pages * PG; o += 8) {
		uint64_t got = *(volatile uint64_t *)(live + o);
		if (got != 0 && failures++ < 5)
			fprintf(stderr, "lazy_child: %s: at %#lx got %#lx want 0\n", what, (unsigned long)(live + o), (unsigned long)got);
	}
}

static void send_all(const void *p, size_t n)
{
	if (send(sock, p, n, MSG_NOSIGNAL) != (ssize_t)n)
		die("send");
}

static void send_uffd(int pid, int fd)
{
	send_all(&pid, sizeof pid);
	char c = 0;
	struct iovec iov = {&c, 1};
	char cbuf[CMSG_SPACE(sizeof(int))];
	memset(cbuf, 0, sizeof cbuf);
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
	struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &fd, sizeof fd);
	if (sendmsg(sock, &m, MSG_NOSIGNAL) != 1)
		die("sendmsg");
}

static void finish(void)
{
	uint32_t marker = 0x52535446;
	send_all(&marker, sizeof marker);
}

static void map_fixed(uint64_t addr, unsigned long pages)
{
	void *p = mmap((void *)addr, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (p != (void *)addr)
		die("mmap");
	madvise(p, pages * PG, MADV_NOHUGEPAGE);
}

static void check_all(int moved)
{
	if (!moved) {
		expect_pattern(A_ADDR, A_ADDR, A_PAGES, "A");
	} else {
		expect_pattern(A_ADDR, A_ADDR, 16, "A[0,16)");
		expect_pattern(C_ADDR, A_ADDR + 32 * PG, 32, "C (A[32,64) moved)");
		expect_zero(A_ADDR + 64 * PG, 16, "A[64,80) after MADV_DONTNEED");
		expect_pattern(A_ADDR + 80 * PG, A_ADDR + 80 * PG, A_PAGES - 80, "A[80,256)");
	}
	expect_pattern(B_ADDR, B_ADDR, B_LAZY, "B lazy part");
	expect_zero(B_ADDR + B_LAZY * PG, B_PAGES - B_LAZY, "B never written");
	expect_zero(D_ADDR, 1, "D present, not lazy");
}

static void *reader(void *arg)
{
	(void)arg;
	expect_pattern(A_ADDR, A_ADDR, A_PAGES, "A from a thread");
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: lazy_child SOCKET MODE IMAGE_PID\n");
		return 2;
	}
	const char *mode = argv[2];
	int image_pid = atoi(argv[3]);

	map_fixed(A_ADDR, A_PAGES);
	map_fixed(B_ADDR, B_PAGES);
	map_fixed(D_ADDR, 1);
	/* Mode split: A's pages 2 and 3 become a VMA of their own, so that the lazy run of A
	 * and the fault block around page 0 cross two VMA boundaries. */
	if (!strcmp(mode, "split") && mprotect((void *)(A_ADDR + 2 * PG), 2 * PG, PROT_READ))
		die("mprotect");

	/* In mode fork the fd is blocking, as a restorer may create it: the daemon must cope,
	 * also for the fd the kernel makes for the forked child. */
	int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | (strcmp(mode, "fork") ? O_NONBLOCK : 0));
	if (uffd < 0)
		die("userfaultfd");
	struct uffdio_api api = {.api = UFFD_API,
				 .features = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
					     UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID};
	if (ioctl(uffd, UFFDIO_API, &api))
		die("UFFDIO_API");
	uint64_t regions[][2] = {{A_ADDR, A_PAGES}, {B_ADDR, B_PAGES}, {D_ADDR, 1}};
	for (int i = 0; i < 3; i++) {
		struct uffdio_register reg = {.range = {regions[i][0], regions[i][1] * PG}, .mode = UFFDIO_REGISTER_MODE_MISSING};
		if (ioctl(uffd, UFFDIO_REGISTER, &reg))
			die("UFFDIO_REGISTER");
	}

	if (!strcmp(mode, "external")) {
		/* Restore's way: the test takes the fd with pidfd_getfd and hands it over
		 * itself; we keep our copy until told to run, as restore keeps duplicates
		 * until the daemon is done or gone. */
		printf("%d\n", uffd);
		fflush(stdout);
		char c;
		if (read(0, &c, 1) != 1)
			die("read stdin");
		close(uffd);
		check_all(0);
		if (failures) {
			fprintf(stderr, "lazy_child: %ld words differed\n", failures);
			return 1;
		}
		return 0;
	}
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
	if (connect(sock, (struct sockaddr *)&sa, sizeof sa))
		die("connect");
	send_uffd(image_pid, uffd);
	close(uffd); /* the daemon holds the only reference now, as after a CRIU restore */

	if (!strcmp(mode, "basic")) {
		/* A read() into a lazy page faults in kernel mode. */
		int p[2];
		if (pipe(p))
			die("pipe");
		const char msg[] = "written by the kernel into a lazy page";
		if (write(p[1], msg, sizeof msg) != sizeof msg)
			die("write");
		char *dst = (char *)(A_ADDR + 200 * PG + 100);
		if (read(p[0], dst, sizeof msg) != sizeof msg)
			die("read into a lazy page");
		if (memcmp(dst, msg, sizeof msg) && failures++ < 5)
			fprintf(stderr, "lazy_child: read() into a lazy page: wrong data\n");
		/* The rest of that page is the image's; put the image's words back under the
		 * message so that the full check below can run. */
		for (unsigned long o = 96; o < 100 + sizeof msg + 8; o += 8)
			*(uint64_t *)(A_ADDR + 200 * PG + o) = pattern(A_ADDR + 200 * PG + o);
		check_all(0);
		finish();
	} else if (!strcmp(mode, "fork")) {
		expect_pattern(A_ADDR, A_ADDR, 10, "A before fork");
		pid_t child = fork();
		if (child < 0)
			die("fork");
		if (child == 0) {
			check_all(0);
			_exit(failures ? 1 : 0);
		}
		finish();
		check_all(0);
		int status;
		if (waitpid(child, &status, 0) != child)
			die("waitpid");
		if (!WIFEXITED(status) || WEXITSTATUS(status)) {
			fprintf(stderr, "lazy_child: forked child failed (status %#x)\n", status);
			failures++;
		}
	} else if (!strcmp(mode, "mm")) {
		expect_pattern(A_ADDR, A_ADDR, 2, "A before munmap");
		if (munmap((void *)(A_ADDR + 16 * PG), 16 * PG))
			die("munmap");
		if (mremap((void *)(A_ADDR + 32 * PG), 32 * PG, 32 * PG, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)C_ADDR) != (void *)C_ADDR)
			die("mremap");
		if (madvise((void *)(A_ADDR + 64 * PG), 16 * PG, MADV_DONTNEED))
			die("madvise");
		/* Touch part of the moved range before the background transfer starts. */
		expect_pattern(C_ADDR + 5 * PG, A_ADDR + 37 * PG, 3, "C before finish");
		finish();
		check_all(1);
	} else if (!strcmp(mode, "threads")) {
		pthread_t t[4];
		for (int i = 0; i < 4; i++)
			pthread_create(&t[i], NULL, reader, NULL);
		for (int i = 0; i < 4; i++)
			pthread_join(t[i], NULL);
		finish();
		check_all(0);
	} else if (!strcmp(mode, "background")) {
		finish();
		/* Wait until the test saw the daemon exit: every page must be in by then. */
		char c;
		if (read(0, &c, 1) != 1)
			die("read stdin");
		check_all(0);
	} else if (!strcmp(mode, "split")) {
		expect_pattern(A_ADDR, A_ADDR, 1, "A page 0, its block crossing a VMA boundary");
		expect_pattern(A_ADDR + 3 * PG, A_ADDR + 3 * PG, 1, "A page 3, in the read-only VMA");
		finish();
		check_all(0);
	} else if (!strcmp(mode, "early_exit")) {
		expect_pattern(A_ADDR, A_ADDR, 3, "A before exit");
		finish();
		_exit(0);
	} else {
		fprintf(stderr, "lazy_child: unknown mode %s\n", mode);
		return 2;
	}
	if (failures) {
		fprintf(stderr, "lazy_child: %ld words differed\n", failures);
		return 1;
	}
	return 0;
}
