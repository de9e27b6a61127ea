/* A small tree for the lazy hand-off of several processes: process 1 maps a region it
 * never touches and forks process 2, which maps its own; the test seizes both, hands
 * their userfaultfds to the daemon over one session (images 4001 and 4002 hold their
 * pages), and writes DIR/go. Then process 2 forks process 3 while pages are missing,
 * and each process checks every word of its region against its own pattern.
 *
 * usage: lazy_session DIR MODE
 *   check  every process checks its whole region, writes "ok" (or what differed) to
 *          DIR/result-N and exits 0 if it matched; 1 waits for 2, 2 for 3.
 *   slow   each process touches its first page, then 1 exits (2 and 3 are orphans),
 *          and 2 and 3 go on touching one page every 2 ms; DIR/pids holds
 *          "PID2 PID3" once 3 exists. Meant to be killed.
 * DIR/ready holds "PID1 PID2" once both regions are mapped. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL
#define REGION 0x500000000000UL
#define PAGES 1024UL

static char dir[512];

/* The test writes the same values into the images of process N (image pid 4000 + N). */
static uint64_t pattern(uint64_t addr, int n) { return (addr * 0x9E3779B97F4A7C15ULL) ^ (uint64_t)n; }

static void write_file(const char *name, const char *text)
{
	char path[600], tmp[640];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		_exit(3);
	close(fd);
	if (rename(tmp, path))
		_exit(3);
}

static int exists(const char *name)
{
	char path[600];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	return access(path, F_OK) == 0;
}

static void nap(long ns)
{
	struct timespec ts = {0, ns};
	nanosleep(&ts, NULL);
}

static void map_region(void)
{
	/* Process 2 inherits 1's mapping at fork: a fresh one replaces it, so that its pages
	 * are its own (missing, registered on its own userfaultfd). */
	void *r = mmap((void *)REGION, PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (r != (void *)REGION)
		_exit(2);
}

/* Checks the region against process n's pattern; reports as process `who`. */
static int check(int n, int who)
{
	long bad = 0;
	char text[256] = "ok\n";
	for (uint64_t a = REGION; a < REGION + PAGES * PG; a += 8) {
		uint64_t got = *(volatile uint64_t *)a;
		if (got != pattern(a, n) && bad++ == 0)
			snprintf(text, sizeof text, "process %d: at %#lx got %#lx want %#lx\n", who, (unsigned long)a,
				 (unsigned long)got, (unsigned long)pattern(a, n));
	}
	char name[32];
	snprintf(name, sizeof name, "result-%d", who);
	write_file(name, text);
	return bad != 0;
}

/* Touches one page every 2 ms, forever (pattern of process n, reported as `who`). */
static void slow(int n, int who)
{
	for (uint64_t a = REGION;; a += PG) {
		if (a >= REGION + PAGES * PG)
			a = REGION;
		if (*(volatile uint64_t *)a != pattern(a, n)) {
			char name[32];
			snprintf(name, sizeof name, "result-%d", who);
			write_file(name, "wrong memory\n");
		}
		nap(2000000);
	}
}

static int wait_ok(pid_t pid)
{
	int status;
	return waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	snprintf(dir, sizeof dir, "%s", argv[1]);
	int is_slow = !strcmp(argv[2], "slow");
	map_region();
	pid_t two = fork();
	if (two < 0)
		return 2;
	int n = two == 0 ? 2 : 1;
	if (n == 2) {
		map_region();
		write_file("mapped-2", "1\n");
	} else {
		while (!exists("mapped-2"))
			nap(50000);
		char text[64];
		snprintf(text, sizeof text, "%d %d\n", getpid(), two);
		write_file("ready", text);
	}
	while (!exists("go"))
		nap(50000);
	if (is_slow) {
		if (*(volatile uint64_t *)REGION != pattern(REGION, n))
			return 1;
		if (n == 1)
			return 0;
		pid_t three = fork();
		if (three < 0)
			return 2;
		if (three == 0)
			slow(2, 3); /* its parent's pages: the daemon follows the fork */
		char text[64];
		snprintf(text, sizeof text, "%d %d\n", getpid(), three);
		write_file("pids", text);
		slow(2, 2);
	}
	if (n == 1) {
		int bad = check(1, 1);
		return !wait_ok(two) || bad;
	}
	pid_t three = fork();
	if (three < 0)
		return 2;
	if (three == 0) {
		/* Its parent's pages: the daemon follows the fork. */
		return check(2, 3);
	}
	int bad = check(2, 2);
	return !wait_ok(three) || bad;
}
