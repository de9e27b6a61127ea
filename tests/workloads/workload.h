/* Shared protocol of the self-checking workloads.
 *
 *   WORKLOAD --ready READY_FILE --result RESULT_FILE [args]
 *
 * A workload sets up the state under test, writes READY_FILE (tmp + rename, so the harness never
 * reads a half-written file), waits until SIGUSR2 arrives (sent after the restore), checks that
 * the state is intact and writes "PASS" or "FAIL: <what differed>" to RESULT_FILE, exiting 0 or 1.
 *
 * Everything is in this header so that each workload is a single translation unit.
 */
#ifndef CKPT_WORKLOAD_H
#define CKPT_WORKLOAD_H

#define _GNU_SOURCE
#pragma GCC diagnostic ignored "-Wunused-function"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static const char *wl_ready_path;
static const char *wl_result_path;
static volatile sig_atomic_t wl_got_usr2;
static char wl_failures[8192];
static size_t wl_failures_len;

/* Remaining arguments after --ready/--result, for the workload's own options. */
static int wl_argc;
static char **wl_argv;

static void wl_usr2(int sig)
{
	(void)sig;
	wl_got_usr2 = 1;
}

static void wl_die(const char *what)
{
	fprintf(stderr, "workload setup failed: %s: %s\n", what, strerror(errno));
	exit(2);
}

/* Records one difference; all of them end up in RESULT_FILE. */
__attribute__((format(printf, 1, 2))) static void wl_fail(const char *fmt, ...)
{
	if (wl_failures_len + 4 >= sizeof wl_failures)
		return;
	if (wl_failures_len)
		wl_failures_len += (size_t)snprintf(wl_failures + wl_failures_len, sizeof wl_failures - wl_failures_len, "; ");
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(wl_failures + wl_failures_len, sizeof wl_failures - wl_failures_len, fmt, ap);
	va_end(ap);
	if (n > 0)
		wl_failures_len += (size_t)n;
	if (wl_failures_len >= sizeof wl_failures)
		wl_failures_len = sizeof wl_failures - 1;
}

static void wl_write_atomic(const char *path, const char *text)
{
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
	if (fd < 0)
		wl_die("open result/ready tmp file");
	size_t len = strlen(text);
	if (write(fd, text, len) != (ssize_t)len)
		wl_die("write result/ready file");
	close(fd);
	if (rename(tmp, path))
		wl_die("rename result/ready file");
}

/* Parses the protocol arguments and installs the SIGUSR2 handler. */
static void wl_init(int argc, char **argv)
{
	int i = 1;
	for (; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--ready"))
			wl_ready_path = argv[i + 1];
		else if (!strcmp(argv[i], "--result"))
			wl_result_path = argv[i + 1];
		else
			break;
	}
	if (!wl_ready_path || !wl_result_path) {
		fprintf(stderr, "usage: %s --ready FILE --result FILE [args]\n", argv[0]);
		exit(2);
	}
	/* Whatever the launcher leaked (pipes, sockets) is not state under test. */
	close_range(3, ~0U, 0);
	wl_argc = argc - i;
	wl_argv = argv + i;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = wl_usr2;
	if (sigaction(SIGUSR2, &sa, NULL))
		wl_die("sigaction SIGUSR2");
}

/* Value of option NAME among the workload's own arguments, or DEF. */
static const char *wl_opt(const char *name, const char *def)
{
	for (int i = 0; i + 1 < wl_argc; i++)
		if (!strcmp(wl_argv[i], name))
			return wl_argv[i + 1];
	return def;
}

static long wl_opt_long(const char *name, long def)
{
	const char *v = wl_opt(name, NULL);
	return v ? strtol(v, NULL, 0) : def;
}

static void wl_ready_with(const char *text)
{
	wl_write_atomic(wl_ready_path, text);
}

static void wl_ready(void)
{
	wl_ready_with("ready\n");
}

/* The directory holding the ready file: the workload's own scratch space. */
static void wl_dir(char *out, size_t size)
{
	snprintf(out, size, "%s", wl_ready_path);
	char *slash = strrchr(out, '/');
	if (slash)
		*slash = 0;
	else
		snprintf(out, size, ".");
}

static double wl_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Waits for SIGUSR2 in short relative sleeps: a sleep cut short by the dump/restore just loops. */
static void wl_wait_sleeping(void)
{
	while (!wl_got_usr2) {
		struct timespec ts = { 0, 5 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
}

/* Waits for SIGUSR2 without entering the kernel. */
static void wl_wait_spinning(void)
{
	while (!wl_got_usr2)
		__asm__ volatile("pause" ::: "memory");
}

/* Writes the verdict and exits. */
static __attribute__((noreturn)) void wl_finish(void)
{
	if (wl_failures_len == 0) {
		wl_write_atomic(wl_result_path, "PASS\n");
		exit(0);
	}
	char text[sizeof wl_failures + 16];
	snprintf(text, sizeof text, "FAIL: %s\n", wl_failures);
	wl_write_atomic(wl_result_path, text);
	exit(1);
}

/* Reads a whole (small) file such as /proc/self/status into BUF; returns its length or -1. */
static ssize_t wl_read_file(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t off = 0;
	while (off + 1 < size) {
		ssize_t n = read(fd, buf + off, size - 1 - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		off += (size_t)n;
	}
	close(fd);
	buf[off] = 0;
	return (ssize_t)off;
}

/* Copies the value of "Key:" from /proc/self/status (trimmed) into OUT. */
static int wl_status_field(const char *key, char *out, size_t size)
{
	static char buf[16384];
	if (wl_read_file("/proc/self/status", buf, sizeof buf) < 0)
		return -1;
	size_t klen = strlen(key);
	for (char *line = buf; line && *line;) {
		char *nl = strchr(line, '\n');
		if (!strncmp(line, key, klen) && line[klen] == ':') {
			char *v = line + klen + 1;
			while (*v == ' ' || *v == '\t')
				v++;
			size_t len = nl ? (size_t)(nl - v) : strlen(v);
			if (len >= size)
				len = size - 1;
			memcpy(out, v, len);
			out[len] = 0;
			return 0;
		}
		line = nl ? nl + 1 : NULL;
	}
	return -1;
}

/* Threads of this process, as the kernel lists them. */
static long wl_count_tasks(void)
{
	DIR *d = opendir("/proc/self/task");
	if (!d)
		return -1;
	long n = 0;
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

#endif
