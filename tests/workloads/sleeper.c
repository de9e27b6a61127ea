/* A thread blocked in a system call when dumped:
 *   --mode relative  nanosleep(30 s) with SIGUSR2 blocked: after the restore it must end early
 *                    with EINTR (the kernel's restart block does not survive a restore)
 *   --mode absolute  clock_nanosleep(TIMER_ABSTIME) to ready+3 s: it must restart and end at
 *                    the deadline, not before
 *   --mode futex     a second thread blocked in pthread_cond_wait (futex, restarted) must wake
 *                    up when signalled after the restore
 *   --mode pause     the main thread waits in sigsuspend
 *   --mode poll      poll(NULL, 0, 30 s) with SIGUSR2 blocked: like a relative sleep, it must
 *                    end early with EINTR
 *   --mode select    select() with a 3 s timeout: it restarts with the time it had left and
 *                    must not end before its 3 s are up
 *   --mode robust    a thread holds a robust mutex; after the restore it exits holding it and
 *                    the kernel, walking the thread's robust list, must hand the mutex on with
 *                    EOWNERDEAD */
#include "workload.h"

#include <poll.h>
#include <pthread.h>
#include <sys/select.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int go, woke;

static pthread_mutex_t robust;
static volatile int robust_locked, robust_exit;

static void *robust_holder(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&robust);
	robust_locked = 1;
	while (!robust_exit) {
		struct timespec ts = { 0, 5 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	return NULL; /* exits holding the mutex */
}

static void block_usr2(sigset_t *old)
{
	sigset_t usr2;
	sigemptyset(&usr2);
	sigaddset(&usr2, SIGUSR2);
	sigprocmask(SIG_BLOCK, &usr2, old);
}

static void *waiter(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&lock);
	while (!go)
		pthread_cond_wait(&cond, &lock);
	woke = 1;
	pthread_mutex_unlock(&lock);
	return NULL;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	const char *mode = wl_opt("--mode", "relative");
	if (!strcmp(mode, "relative")) {
		sigset_t usr2, old;
		sigemptyset(&usr2);
		sigaddset(&usr2, SIGUSR2);
		sigprocmask(SIG_BLOCK, &usr2, &old);
		struct timespec t = { 30, 0 }, left = { 0, 0 };
		double start = wl_now();
		wl_ready();
		int rc = nanosleep(&t, &left);
		int err = errno;
		double slept = wl_now() - start;
		sigprocmask(SIG_SETMASK, &old, NULL);
		wl_wait_sleeping();
		if (rc == 0)
			wl_fail("nanosleep(30 s) slept to the end (%.1f s) instead of ending early", slept);
		else if (err != EINTR)
			wl_fail("nanosleep failed with %s, expected EINTR", strerror(err));
		else if (slept >= 29.0)
			wl_fail("nanosleep ended after %.1f s", slept);
		else if (left.tv_sec > 30 || (left.tv_sec == 0 && left.tv_nsec == 0))
			wl_fail("nanosleep reported %ld.%09ld s left", (long)left.tv_sec, left.tv_nsec);
	} else if (!strcmp(mode, "absolute")) {
		sigset_t usr2, old;
		sigemptyset(&usr2);
		sigaddset(&usr2, SIGUSR2);
		sigprocmask(SIG_BLOCK, &usr2, &old);
		struct timespec deadline;
		clock_gettime(CLOCK_MONOTONIC, &deadline);
		deadline.tv_sec += 3;
		wl_ready();
		int rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL);
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		sigprocmask(SIG_SETMASK, &old, NULL);
		wl_wait_sleeping();
		if (rc != 0)
			wl_fail("clock_nanosleep(TIMER_ABSTIME) returned %s", strerror(rc));
		else if (now.tv_sec < deadline.tv_sec || (now.tv_sec == deadline.tv_sec && now.tv_nsec < deadline.tv_nsec))
			wl_fail("clock_nanosleep(TIMER_ABSTIME) ended before its deadline");
	} else if (!strcmp(mode, "futex")) {
		pthread_t t;
		if (pthread_create(&t, NULL, waiter, NULL))
			wl_die("pthread_create");
		while (wl_count_tasks() < 2)
			usleep(1000);
		usleep(50000); /* let it block in the futex */
		wl_ready();
		wl_wait_sleeping();
		pthread_mutex_lock(&lock);
		go = 1;
		pthread_cond_signal(&cond);
		pthread_mutex_unlock(&lock);
		struct timespec limit;
		clock_gettime(CLOCK_REALTIME, &limit);
		limit.tv_sec += 5;
		if (pthread_timedjoin_np(t, NULL, &limit))
			wl_fail("the thread blocked in pthread_cond_wait did not wake up within 5 s");
		else if (!woke)
			wl_fail("the waiting thread ended without seeing the condition");
	} else if (!strcmp(mode, "pause")) {
		sigset_t none;
		sigemptyset(&none);
		wl_ready();
		while (!wl_got_usr2)
			sigsuspend(&none);
	} else if (!strcmp(mode, "poll")) {
		sigset_t old;
		block_usr2(&old);
		double start = wl_now();
		wl_ready();
		int rc = poll(NULL, 0, 30000);
		int err = errno;
		double slept = wl_now() - start;
		sigprocmask(SIG_SETMASK, &old, NULL);
		wl_wait_sleeping();
		if (rc == 0)
			wl_fail("poll(30 s) ran to its timeout (%.1f s) instead of ending early", slept);
		else if (err != EINTR)
			wl_fail("poll failed with %s, expected EINTR", strerror(err));
	} else if (!strcmp(mode, "select")) {
		sigset_t old;
		block_usr2(&old);
		struct timeval tv = { 3, 0 };
		double start = wl_now();
		wl_ready();
		int rc = select(0, NULL, NULL, NULL, &tv);
		int err = errno;
		double slept = wl_now() - start;
		sigprocmask(SIG_SETMASK, &old, NULL);
		wl_wait_sleeping();
		if (rc != 0)
			wl_fail("select returned %d (%s), expected its timeout", rc, strerror(err));
		else if (slept < 2.9)
			wl_fail("select(3 s) timed out after %.2f s", slept);
	} else if (!strcmp(mode, "robust")) {
		pthread_mutexattr_t attr;
		pthread_mutexattr_init(&attr);
		pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
		pthread_mutex_init(&robust, &attr);
		pthread_t t;
		if (pthread_create(&t, NULL, robust_holder, NULL))
			wl_die("pthread_create");
		while (!robust_locked)
			usleep(1000);
		wl_ready();
		wl_wait_sleeping();
		robust_exit = 1;
		pthread_join(t, NULL);
		struct timespec limit;
		clock_gettime(CLOCK_REALTIME, &limit);
		limit.tv_sec += 5;
		int rc = pthread_mutex_timedlock(&robust, &limit);
		if (rc != EOWNERDEAD)
			wl_fail("locking the mutex its dead owner held gave %s, expected EOWNERDEAD", strerror(rc));
	} else {
		fprintf(stderr, "unknown --mode %s\n", mode);
		return 2;
	}
	wl_finish();
}
