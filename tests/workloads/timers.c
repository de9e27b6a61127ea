/* Interval timers and POSIX timers: ITIMER_REAL and ITIMER_VIRTUAL armed far in the future, three
 * POSIX timers (a far one-shot with a signal value, a SIGEV_NONE one, and a periodic one that keeps
 * firing). After the restore the timer ids are the same (/proc/self/timers and timer_gettime),
 * remaining times went down by about the elapsed time, and the periodic timer fires again. */
#include "workload.h"

#include <sys/time.h>

#define PERIODIC_SIG (SIGRTMIN + 2)

static volatile int periodic_fires;
static volatile int periodic_value;

static void on_periodic(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	periodic_fires++;
	periodic_value = si->si_value.sival_int;
}

static void on_alarm(int sig)
{
	(void)sig;
}

static double ts_sec(struct timespec t)
{
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double tv_sec(struct timeval t)
{
	return (double)t.tv_sec + (double)t.tv_usec / 1e6;
}

static timer_t make_timer(clockid_t clock, int notify, int sig, int value)
{
	struct sigevent sev;
	memset(&sev, 0, sizeof sev);
	sev.sigev_notify = notify;
	sev.sigev_signo = sig;
	sev.sigev_value.sival_int = value;
	timer_t id;
	if (timer_create(clock, &sev, &id))
		wl_die("timer_create");
	return id;
}

static void arm(timer_t id, long sec, long interval_ms)
{
	struct itimerspec its = { .it_value = { sec, interval_ms * 1000000L % 1000000000L },
				  .it_interval = { interval_ms / 1000, interval_ms % 1000 * 1000000L } };
	if (sec == 0 && interval_ms == 0)
		its.it_value.tv_nsec = 1;
	if (timer_settime(id, 0, &its, NULL))
		wl_die("timer_settime");
}

static char proc_timers_before[8192], proc_timers_after[8192];

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_periodic;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(PERIODIC_SIG, &sa, NULL);
	sa.sa_flags = SA_RESTART;
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, NULL);
	sigaction(SIGVTALRM, &sa, NULL);

	struct itimerval real = { .it_interval = { 100, 0 }, .it_value = { 90, 0 } };
	struct itimerval virt = { .it_interval = { 0, 0 }, .it_value = { 50, 0 } };
	if (setitimer(ITIMER_REAL, &real, NULL) || setitimer(ITIMER_VIRTUAL, &virt, NULL))
		wl_die("setitimer");

	timer_t far = make_timer(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 1, 7);
	timer_t silent = make_timer(CLOCK_REALTIME, SIGEV_NONE, 0, 0);
	timer_t periodic = make_timer(CLOCK_MONOTONIC, SIGEV_SIGNAL, PERIODIC_SIG, 99);
	arm(far, 60, 0);
	arm(silent, 120, 0);
	arm(periodic, 0, 100);

	struct itimerspec far_before, silent_before;
	struct itimerval real_before;
	timer_gettime(far, &far_before);
	timer_gettime(silent, &silent_before);
	getitimer(ITIMER_REAL, &real_before);
	double t_ready = wl_now();
	wl_read_file("/proc/self/timers", proc_timers_before, sizeof proc_timers_before);
	wl_ready();
	wl_wait_sleeping();

	double elapsed = wl_now() - t_ready;
	wl_read_file("/proc/self/timers", proc_timers_after, sizeof proc_timers_after);
	if (strcmp(proc_timers_before, proc_timers_after))
		wl_fail("/proc/self/timers differs: before '%s' after '%s'", proc_timers_before, proc_timers_after);

	struct itimerspec far_now, silent_now;
	if (timer_gettime(far, &far_now) || timer_gettime(silent, &silent_now)) {
		wl_fail("timer_gettime on an old timer id: %s", strerror(errno));
	} else {
		double far_left = ts_sec(far_now.it_value), far_expect = ts_sec(far_before.it_value) - elapsed;
		if (far_left > ts_sec(far_before.it_value) || far_left < far_expect - 1.0)
			wl_fail("one-shot POSIX timer: %.3f s left, expected about %.3f", far_left, far_expect);
		double silent_left = ts_sec(silent_now.it_value), silent_expect = ts_sec(silent_before.it_value) - elapsed;
		if (silent_left > ts_sec(silent_before.it_value) || silent_left < silent_expect - 1.0)
			wl_fail("SIGEV_NONE timer: %.3f s left, expected about %.3f", silent_left, silent_expect);
	}
	struct itimerval real_now, virt_now;
	getitimer(ITIMER_REAL, &real_now);
	getitimer(ITIMER_VIRTUAL, &virt_now);
	double real_left = tv_sec(real_now.it_value), real_expect = tv_sec(real_before.it_value) - elapsed;
	if (real_left > tv_sec(real_before.it_value) || real_left < real_expect - 1.0)
		wl_fail("ITIMER_REAL: %.3f s left, expected about %.3f", real_left, real_expect);
	if (real_now.it_interval.tv_sec != 100)
		wl_fail("ITIMER_REAL interval %ld s", (long)real_now.it_interval.tv_sec);
	double virt_left = tv_sec(virt_now.it_value);
	if (virt_left <= 40.0 || virt_left > 50.1)
		wl_fail("ITIMER_VIRTUAL: %.3f s left, expected just under 50", virt_left);

	int fires = periodic_fires;
	struct timespec wait = { 0, 600 * 1000 * 1000 };
	while (nanosleep(&wait, &wait) && errno == EINTR)
		;
	if (periodic_fires < fires + 2)
		wl_fail("periodic timer fired %d times in 0.6 s after the restore", periodic_fires - fires);
	if (periodic_value != 99)
		wl_fail("periodic timer signal value %d", periodic_value);
	wl_finish();
}
