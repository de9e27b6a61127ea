/* N threads (--threads N, default 8), each with its own TLS value, name, signal mask, alternate
 * signal stack, pending signal (sent to it with tgkill while blocked) and counter. After the
 * restore: the same thread count in /proc/self/task, every thread still has its TID, TLS, name,
 * mask, altstack, pending signal and rseq registration, and every counter moves again. */
#include "workload.h"

#include <pthread.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/syscall.h>

#define RSEQ_SIG_X86 0x53053053

#define MAX_THREADS 1024

struct worker {
	pthread_t thread;
	long index;
	pid_t tid;
	volatile unsigned long counter;
	volatile int broken; /* set by the thread itself when its own state changed */
	char why[128];
	void *altstack;
	volatile int check_rseq; /* set by main after SIGUSR2: the thread then checks its rseq */
	volatile int rseq_errno; /* what re-registering the same rseq area said (EBUSY: registered) */
	char pending_before[32];
};

static struct worker workers[MAX_THREADS];
static __thread long tls_value;
static __thread char tls_text[32];
static volatile int started;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Asks the kernel to register this thread's glibc rseq area again: EBUSY means it is already
 * registered with exactly these arguments; 0 means it was not registered (and now is). */
static int rseq_registered(void)
{
	if (__rseq_size == 0)
		return EBUSY; /* glibc does not use rseq here: nothing to check */
	char *tp;
	__asm__("mov %%fs:0, %0" : "=r"(tp));
	long rc = syscall(SYS_rseq, tp + __rseq_offset, 32, 0, RSEQ_SIG_X86);
	return rc == 0 ? 0 : errno;
}

static void *run(void *arg)
{
	struct worker *w = arg;
	tls_value = w->index * 1000 + 7;
	snprintf(tls_text, sizeof tls_text, "thread-%ld", w->index);
	w->tid = (pid_t)syscall(SYS_gettid);
	char name[16];
	snprintf(name, sizeof name, "wl-%ld", w->index);
	prctl(PR_SET_NAME, name);
	sigset_t mask, now;
	sigemptyset(&mask);
	if (w->index % 2)
		sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGRTMIN + (int)(w->index % 8));
	sigaddset(&mask, SIGUSR2); /* SIGUSR2 goes to the main thread */
	pthread_sigmask(SIG_SETMASK, &mask, NULL);
	stack_t ss = { .ss_sp = w->altstack, .ss_size = 16384, .ss_flags = 0 };
	if (sigaltstack(&ss, NULL))
		wl_die("sigaltstack");
	pthread_mutex_lock(&lock);
	started++;
	pthread_mutex_unlock(&lock);
	for (;;) {
		w->counter++;
		if (w->check_rseq == 1) {
			w->rseq_errno = rseq_registered();
			w->check_rseq = 2;
		}
		if (!w->broken) {
			stack_t cur;
			sigaltstack(NULL, &cur);
			if (cur.ss_sp != w->altstack || cur.ss_size != 16384) {
				snprintf(w->why, sizeof w->why, "altstack %p+%zu", cur.ss_sp, cur.ss_size);
				w->broken = 1;
			}
			pthread_sigmask(SIG_SETMASK, NULL, &now);
			if (tls_value != w->index * 1000 + 7) {
				snprintf(w->why, sizeof w->why, "TLS value %ld", tls_value);
				w->broken = 1;
			} else if (strcmp(tls_text, "thread-") < 0 || atol(tls_text + 7) != w->index) {
				snprintf(w->why, sizeof w->why, "TLS text '%.30s'", tls_text);
				w->broken = 1;
			} else if (syscall(SYS_gettid) != w->tid) {
				snprintf(w->why, sizeof w->why, "TID %ld, was %d", syscall(SYS_gettid), w->tid);
				w->broken = 1;
			} else if (memcmp(&now, &mask, sizeof mask)) {
				snprintf(w->why, sizeof w->why, "signal mask changed");
				w->broken = 1;
			}
		}
		struct timespec ts = { 0, 20 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	return NULL;
}

/* SigPnd of one thread (its own pending signals), as 16 hex digits. */
static void thread_pending(pid_t tid, char out[32])
{
	char path[64], status[8192];
	snprintf(path, sizeof path, "/proc/self/task/%d/status", tid);
	out[0] = 0;
	if (wl_read_file(path, status, sizeof status) < 0)
		return;
	char *p = strstr(status, "\nSigPnd:");
	if (p)
		sscanf(p + 8, "%31s", out);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	long n = wl_opt_long("--threads", 8);
	if (n < 1 || n > MAX_THREADS) {
		fprintf(stderr, "--threads must be 1..%d\n", MAX_THREADS);
		return 2;
	}
	for (long i = 0; i < n; i++) {
		workers[i].index = i;
		workers[i].altstack = malloc(16384);
		pthread_attr_t attr;
		pthread_attr_init(&attr);
		pthread_attr_setstacksize(&attr, 128 * 1024);
		if (pthread_create(&workers[i].thread, &attr, run, &workers[i]))
			wl_die("pthread_create");
		pthread_attr_destroy(&attr);
	}
	while (started < n) {
		struct timespec ts = { 0, 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	tls_value = -1;
	/* a signal pending on each thread: blocked there, so it stays pending */
	for (long i = 0; i < n; i++) {
		syscall(SYS_tgkill, getpid(), workers[i].tid, SIGRTMIN + (int)(i % 8));
		thread_pending(workers[i].tid, workers[i].pending_before);
	}
	long tasks_before = wl_count_tasks();
	wl_ready();
	wl_wait_sleeping();

	long tasks_after = wl_count_tasks();
	if (tasks_after != tasks_before)
		wl_fail("%ld threads in /proc/self/task, %ld before", tasks_after, tasks_before);
	if (tls_value != -1)
		wl_fail("main thread TLS value %ld", tls_value);
	static unsigned long before[MAX_THREADS];
	for (long i = 0; i < n; i++) {
		before[i] = workers[i].counter;
		workers[i].check_rseq = 1;
	}
	struct timespec ts = { 0, 400 * 1000 * 1000 };
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
	for (long i = 0; i < n; i++) {
		struct worker *w = &workers[i];
		if (w->broken)
			wl_fail("thread %ld: %s", i, w->why);
		if (w->counter == before[i])
			wl_fail("thread %ld (tid %d) does not run", i, w->tid);
		char path[64], comm[64], want[16];
		snprintf(path, sizeof path, "/proc/self/task/%d/comm", w->tid);
		snprintf(want, sizeof want, "wl-%ld\n", i);
		char pending[32];
		thread_pending(w->tid, pending);
		if (strcmp(pending, w->pending_before))
			wl_fail("thread %ld: pending signals %s, were %s", i, pending, w->pending_before);
		if (w->check_rseq != 2)
			wl_fail("thread %ld did not check its rseq", i);
		else if (w->rseq_errno != EBUSY)
			wl_fail("thread %ld: rseq area not registered (re-registering gave %s)", i,
				w->rseq_errno ? strerror(w->rseq_errno) : "success");
		if (wl_read_file(path, comm, sizeof comm) < 0)
			wl_fail("thread %ld: tid %d is gone", i, w->tid);
		else if (strcmp(comm, want))
			wl_fail("thread %ld: name '%s'", i, comm);
	}
	wl_finish();
}
