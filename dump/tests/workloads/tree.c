/* A process tree for the dump of trees: the root forks
 *   A: holds the read end of a pipe the root wrote into, has a second thread, and forks G
 *   G: A's child (the root's grandchild)
 *   B: calls setsid
 *   Z: exits with status 7 at once and is never reaped (a zombie)
 *   S: stops itself with SIGSTOP
 *   F: shares the root's fd table and fs info (clone with CLONE_FILES | CLONE_FS)
 * Every process shares the root's "shared.txt" fd (offset 5) and stdout/stderr, and 4 MiB of
 * private memory the root wrote before forking (copy-on-write, written by no one since).
 * Writes its pids to argv[1] as "root A G B Z S F" once everything is in place. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int ready[2];

static void signal_ready(void)
{
	char c = 'r';
	if (write(ready[1], &c, 1) != 1)
		_exit(3);
}

static void *idle(void *arg)
{
	signal_ready();
	for (;;)
		pause();
	return arg;
}

static void await(int n)
{
	for (int i = 0; i < n; i++) {
		char c;
		if (read(ready[0], &c, 1) != 1)
			exit(4);
	}
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	/* Whatever the harness left open (a build jobserver's pipe) is not ours to keep. */
	syscall(SYS_close_range, 3, ~0U, 0);
	if (pipe(ready))
		return 2;
	int fd = open("shared.txt", O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, "0123456789", 10) != 10 || lseek(fd, 5, SEEK_SET) != 5)
		return 2;
	int data[2];
	if (pipe(data))
		return 2;
	char *cow = mmap(NULL, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (cow == MAP_FAILED)
		return 2;
	memset(cow, 1, 4 << 20);

	pid_t a = fork();
	if (a == 0) {
		close(data[1]);
		pthread_t t;
		if (pthread_create(&t, NULL, idle, NULL))
			_exit(3);
		pid_t g = fork();
		if (g == 0) {
			close(data[0]);
			signal_ready();
			for (;;)
				pause();
		}
		for (;;)
			pause();
	}
	close(data[0]);
	/* Buffered in the pipe until A reads it (it never does before the dump). */
	if (write(data[1], "in the pipe", 11) != 11)
		return 2;

	pid_t b = fork();
	if (b == 0) {
		close(data[1]);
		if (setsid() < 0)
			_exit(3);
		signal_ready();
		for (;;)
			pause();
	}
	pid_t z = fork();
	if (z == 0)
		_exit(7);
	pid_t s = fork();
	if (s == 0) {
		close(data[1]);
		raise(SIGSTOP);
		for (;;)
			pause();
	}
	/* A's thread, G and B. */
	await(3);
	siginfo_t info;
	if (waitid(P_PID, z, &info, WEXITED | WNOWAIT))
		return 5;
	int status;
	if (waitpid(s, &status, WUNTRACED) != s || !WIFSTOPPED(status))
		return 5;
	/* G's pid, from A's children. */
	char path[64], line[64] = "";
	snprintf(path, sizeof(path), "/proc/%d/task/%d/children", a, a);
	FILE *f = fopen(path, "r");
	if (!f || !fgets(line, sizeof(line), f))
		return 6;
	fclose(f);
	int g = atoi(line);
	close(ready[0]);
	close(ready[1]);
	/* Last: from here on, the root's fd table is F's too. */
	pid_t fsh = syscall(SYS_clone, CLONE_FILES | CLONE_FS | SIGCHLD, 0, 0, 0, 0);
	if (fsh == 0) {
		for (;;)
			pause();
	}
	if (fsh < 0)
		return 6;

	char tmp[256];
	snprintf(tmp, sizeof(tmp), "%s.tmp", argv[1]);
	f = fopen(tmp, "w");
	if (!f)
		return 6;
	fprintf(f, "%d %d %d %d %d %d %d\n", getpid(), a, g, b, z, s, fsh);
	fclose(f);
	rename(tmp, argv[1]);
	for (;;)
		pause();
}
