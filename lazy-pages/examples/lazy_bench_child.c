/* The faulting side of lazy_bench: maps SIZE_MB at a fixed address, registers it for
 * missing faults on a userfaultfd, hands it to the daemon (hand-off protocol), then
 *   latency:    pins itself to CPU (unless -1), reads NFAULTS distinct pages in a scattered
 *               order, prints "first_us avg_us" (first answer after the hand-off, and the
 *               mean per fault), sends the end marker and exits;
 *   background: sends the end marker at once, waits for a byte on stdin (the daemon is
 *               done), reads every page and prints the number of wrong pages.
 * Page p of the image holds its own address in its first word.
 * usage: lazy_bench_child SOCKET MODE IMAGE_PID SIZE_MB CPU NFAULTS */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL
#define BASE 0x500000000000UL

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void die(const char *what)
{
	fprintf(stderr, "lazy_bench_child: %s: %s\n", what, strerror(errno));
	_exit(2);
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: lazy_bench_child SOCKET MODE IMAGE_PID SIZE_MB CPU NFAULTS\n");
		return 2;
	}
	int pid = atoi(argv[3]);
	unsigned long pages = strtoul(argv[4], NULL, 0) * 256;
	int cpu = atoi(argv[5]);
	unsigned long nfaults = strtoul(argv[6], NULL, 0);
	if (cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof set, &set))
			die("sched_setaffinity");
	}
	char *mem = mmap((void *)BASE, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (mem != (void *)BASE)
		die("mmap");
	madvise(mem, pages * PG, MADV_NOHUGEPAGE);
	int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	struct uffdio_api api = {.api = UFFD_API,
				 .features = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
					     UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID};
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api))
		die("userfaultfd");
	struct uffdio_register reg = {.range = {BASE, pages * PG}, .mode = UFFDIO_REGISTER_MODE_MISSING};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
	int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
	if (connect(sock, (struct sockaddr *)&sa, sizeof sa))
		die("connect");
	char c = 0;
	struct iovec iov = {&c, 1};
	char cbuf[CMSG_SPACE(sizeof(int))];
	memset(cbuf, 0, sizeof cbuf);
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
	struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &uffd, sizeof uffd);
	double t_handoff = now_us();
	if (send(sock, &pid, sizeof pid, 0) != sizeof pid || sendmsg(sock, &m, 0) != 1)
		die("hand-off");
	close(uffd);
	uint32_t marker = 0x52535446;
	long bad = 0;
	if (!strcmp(argv[2], "latency")) {
		/* the first answer, from the hand-off on */
		if (*(volatile uint64_t *)mem != BASE)
			bad++;
		double first = now_us() - t_handoff;
		/* odd stride over a power-of-two page count: distinct pages, scattered */
		double t0 = now_us();
		for (unsigned long i = 1; i <= nfaults; i++) {
			unsigned long p = (i * 2971UL) % pages;
			if (*(volatile uint64_t *)(mem + p * PG) != BASE + p * PG)
				bad++;
		}
		double avg = (now_us() - t0) / nfaults;
		printf("%.1f %.2f %ld\n", first, avg, bad);
		fflush(stdout);
		if (send(sock, &marker, sizeof marker, 0) != sizeof marker)
			die("end marker");
		return bad ? 1 : 0;
	}
	if (send(sock, &marker, sizeof marker, 0) != sizeof marker)
		die("end marker");
	if (read(0, &c, 1) != 1)
		die("stdin");
	for (unsigned long p = 0; p < pages; p++)
		if (*(volatile uint64_t *)(mem + p * PG) != BASE + p * PG)
			bad++;
	printf("%ld\n", bad);
	return bad ? 1 : 0;
}
