/* Shared pieces of the migration workloads.
 *
 * Every workload keeps a stamps file (in a directory both network namespaces see) and calls
 * mig_tick() once per iteration of its loop. mig_tick() reads CLOCK_MONOTONIC, which every
 * namespace of the host shares, and writes each gap between two iterations longer than the
 * workload's threshold into a ring in the file. The harness reads the ring afterwards: the longest
 * gap inside the migration window is the time the process could not run, wherever it was.
 *
 * The file is written with pwrite() rather than mapped: the dumper does not take shared file
 * mappings yet, and a regular file descriptor migrates. The progress fields are published once a
 * millisecond, a gap at once.
 *
 * Verification is asked for by storing 1 into verify_request (the harness does this through the
 * file, which works across PID namespaces; the workload looks once a millisecond) or by SIGUSR2.
 * The workload then checks its own memory, stores the outcome and a message, prints it and exits.
 *
 * File layout (native-endian u64 fields, offsets in bytes), read by bench/src/migrate/workload.rs:
 *   0 magic   8 iterations   16 last_ns   24 verify_request   32 result (0 pending, 1 pass, 2 fail)
 *   40 ngaps  48 start_ns    56 gap_threshold_ns   64 pid   72 ready   80 message[176]
 *   256 gaps[MIG_GAPS] of {start_ns, end_ns}
 *   256 + 16 * MIG_GAPS   gap_iterations[MIG_GAPS]: the iteration count at each gap's end (the
 *   same slot as the gap), from which the harness counts what the process did after a resume
 */
#ifndef MIG_H
#define MIG_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MIG_MAGIC 0x504d415453474d43ULL
#define MIG_GAPS 16384
#define MIG_RESULT_PASS 1
#define MIG_RESULT_FAIL 2

struct mig_gap {
	uint64_t start_ns;
	uint64_t end_ns;
};

struct mig_stamps {
	uint64_t magic;
	uint64_t iterations;
	uint64_t last_ns;
	uint64_t verify_request;
	uint64_t result;
	uint64_t ngaps;
	uint64_t start_ns;
	uint64_t gap_threshold_ns;
	uint64_t pid;
	uint64_t ready;
	char message[176];
	struct mig_gap gaps[MIG_GAPS];
	uint64_t gap_iterations[MIG_GAPS];
};

_Static_assert(sizeof(struct mig_stamps) == 256 + 24 * MIG_GAPS, "layout read by the harness");

static struct mig_stamps mig_head; /* only the 256-byte header part is used */
static int mig_fd = -1;
static uint64_t mig_last;
static uint64_t mig_published;
static uint64_t mig_threshold;
static volatile sig_atomic_t mig_signalled;
/* Returns 0 when the workload's memory is as it should be, else writes why into msg. */
static int (*mig_verify)(char *msg, size_t len);

#define MIG_HEAD 256

static inline uint64_t mig_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void mig_die(const char *what)
{
	fprintf(stderr, "workload: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void mig_put(const void *what, size_t len, uint64_t offset)
{
	if (pwrite(mig_fd, what, len, (off_t)offset) != (ssize_t)len)
		mig_die("write stamps file");
}

#define MIG_PUT(field) mig_put(&mig_head.field, sizeof mig_head.field, offsetof(struct mig_stamps, field))

static void mig_on_sigusr2(int sig)
{
	(void)sig;
	mig_signalled = 1;
}

static void mig_init(const char *stamps_path, uint64_t gap_threshold_ns, int (*verify)(char *, size_t))
{
	/* Whatever the launcher leaked (a terminal multiplexer's pipes...) is not ours to migrate. */
	close_range(3, ~0U, 0);
	mig_fd = open(stamps_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (mig_fd < 0)
		mig_die("open stamps file");
	if (ftruncate(mig_fd, sizeof(struct mig_stamps)))
		mig_die("size stamps file");
	mig_verify = verify;
	mig_threshold = gap_threshold_ns;
	mig_head.gap_threshold_ns = gap_threshold_ns;
	mig_head.pid = (uint64_t)getpid();
	mig_head.magic = MIG_MAGIC;
	mig_put(&mig_head, MIG_HEAD, 0);
	struct sigaction sa = {.sa_handler = mig_on_sigusr2};
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR2, &sa, NULL))
		mig_die("sigaction");
}

/* Called once the workload's state is built: the loop starts now. */
static void mig_ready(void)
{
	mig_last = mig_now();
	mig_head.start_ns = mig_last;
	mig_head.last_ns = mig_last;
	mig_head.ready = 1;
	mig_put(&mig_head, MIG_HEAD, 0);
}

static void mig_check_and_exit(void)
{
	char msg[sizeof mig_head.message] = "";
	int bad = mig_verify(msg, sizeof msg);
	if (!bad && (uint64_t)getpid() != mig_head.pid) {
		snprintf(msg, sizeof msg, "pid changed from %llu to %d", (unsigned long long)mig_head.pid,
			 getpid());
		bad = 1;
	}
	if (!bad)
		snprintf(msg, sizeof msg, "PASS after %llu iterations",
			 (unsigned long long)mig_head.iterations);
	memcpy(mig_head.message, msg, sizeof msg);
	mig_head.result = bad ? MIG_RESULT_FAIL : MIG_RESULT_PASS;
	/* The verdict last: the harness reads the message once it sees a result. */
	MIG_PUT(message);
	MIG_PUT(iterations);
	MIG_PUT(last_ns);
	MIG_PUT(result);
	printf("%s\n", msg);
	exit(bad ? 1 : 0);
}

static inline void mig_tick(void)
{
	uint64_t now = mig_now();
	mig_head.iterations++;
	if (now - mig_last > mig_threshold) {
		struct mig_gap gap = {mig_last, now};
		uint64_t slot = mig_head.ngaps % MIG_GAPS;
		mig_put(&gap, sizeof gap, MIG_HEAD + slot * sizeof gap);
		mig_put(&mig_head.iterations, sizeof mig_head.iterations,
			offsetof(struct mig_stamps, gap_iterations) + slot * sizeof(uint64_t));
		mig_head.ngaps++;
		MIG_PUT(ngaps);
	}
	mig_last = now;
	if (now - mig_published > 1000000 || mig_signalled) {
		mig_published = now;
		mig_head.last_ns = now;
		MIG_PUT(iterations);
		MIG_PUT(last_ns);
		uint64_t request = 0;
		if (pread(mig_fd, &request, sizeof request, offsetof(struct mig_stamps, verify_request)) !=
		    sizeof request)
			mig_die("read stamps file");
		if (request || mig_signalled)
			mig_check_and_exit();
	}
}

static inline uint64_t mig_xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

__attribute__((unused)) static unsigned long long mig_arg(int argc, char **argv, int i, unsigned long long def)
{
	return argc > i ? strtoull(argv[i], NULL, 0) : def;
}

#endif
