/* Signal state: custom handlers with SA_SIGINFO/SA_RESTART/SA_ONSTACK/SA_NODEFER/SA_RESETHAND and
 * handler masks, ignored signals, an alternate signal stack, a blocked mask, and pending signals
 * (two queued real-time signals with values, one standard signal) that must still be pending
 * after the restore and arrive, in order and with their values, once unblocked. */
#include "workload.h"

#define QUEUED (SIGRTMIN + 3)

static volatile int got_hup, got_term, got_winch;
static volatile int queued_values[8];
static volatile int queued_count;
static volatile pid_t queued_pid[8];
static volatile int queued_code[8];
static void *altstack;

static void on_hup(int sig)
{
	(void)sig;
	got_hup++;
}

static void on_term(int sig)
{
	(void)sig;
	got_term++;
}

static void on_winch(int sig)
{
	(void)sig;
	got_winch++;
}

static void on_queued(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	if (queued_count < 8) {
		queued_values[queued_count] = si->si_value.sival_int;
		queued_pid[queued_count] = si->si_pid;
		queued_code[queued_count] = si->si_code;
		queued_count++;
	}
}

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)si;
	(void)uc;
}

static void set(int sig, void (*handler)(int), void (*action)(int, siginfo_t *, void *), int flags, int masked)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	if (action)
		sa.sa_sigaction = action;
	else
		sa.sa_handler = handler;
	sa.sa_flags = flags | (action ? SA_SIGINFO : 0);
	sigemptyset(&sa.sa_mask);
	if (masked)
		sigaddset(&sa.sa_mask, masked);
	if (sigaction(sig, &sa, NULL))
		wl_die("sigaction");
}

static struct sigaction before[65];

/* glibc keeps 32 and 33 for itself and refuses sigaction on them */
static int libc_reserved(int sig)
{
	return sig > 31 && sig < SIGRTMIN;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	set(SIGHUP, on_hup, NULL, SA_NODEFER | SA_RESETHAND, 0);
	set(SIGTERM, on_term, NULL, SA_RESTART, SIGQUIT);
	set(SIGUSR1, NULL, on_usr1, SA_ONSTACK | SA_RESTART, SIGRTMIN + 7);
	set(SIGWINCH, on_winch, NULL, 0, 0);
	set(QUEUED, NULL, on_queued, SA_RESTART, 0);
	set(SIGINT, SIG_IGN, NULL, 0, 0);
	set(SIGPIPE, SIG_IGN, NULL, 0, 0);
	set(SIGRTMIN + 10, SIG_IGN, NULL, 0, 0);

	stack_t ss = { .ss_size = 64 * 1024, .ss_flags = 0 };
	altstack = malloc(ss.ss_size);
	ss.ss_sp = altstack;
	if (sigaltstack(&ss, NULL))
		wl_die("sigaltstack");

	sigset_t blocked;
	sigemptyset(&blocked);
	sigaddset(&blocked, QUEUED);
	sigaddset(&blocked, SIGWINCH);
	sigaddset(&blocked, SIGRTMIN + 5);
	sigaddset(&blocked, SIGALRM);
	if (sigprocmask(SIG_SETMASK, &blocked, NULL))
		wl_die("sigprocmask");
	union sigval v1 = { .sival_int = 4242 }, v2 = { .sival_int = 4343 };
	if (sigqueue(getpid(), QUEUED, v1) || sigqueue(getpid(), QUEUED, v2))
		wl_die("sigqueue");
	raise(SIGWINCH); /* raise() directs it at this thread: a per-thread pending signal */

	for (int sig = 1; sig <= 64; sig++)
		if (!libc_reserved(sig) && sig != SIGKILL && sig != SIGSTOP && sigaction(sig, NULL, &before[sig]))
			wl_die("sigaction read");
	wl_ready();
	wl_wait_sleeping();

	for (int sig = 1; sig <= 64; sig++) {
		if (libc_reserved(sig) || sig == SIGKILL || sig == SIGSTOP)
			continue;
		struct sigaction now;
		if (sigaction(sig, NULL, &now)) {
			wl_fail("sigaction(%d): %s", sig, strerror(errno));
			continue;
		}
		if (now.sa_handler != before[sig].sa_handler)
			wl_fail("signal %d: handler %p, was %p", sig, (void *)now.sa_handler, (void *)before[sig].sa_handler);
		if (now.sa_flags != before[sig].sa_flags)
			wl_fail("signal %d: flags %#x, were %#x", sig, now.sa_flags, before[sig].sa_flags);
		if (now.sa_restorer != before[sig].sa_restorer)
			wl_fail("signal %d: restorer %p, was %p", sig, (void *)now.sa_restorer, (void *)before[sig].sa_restorer);
		if (memcmp(&now.sa_mask, &before[sig].sa_mask, 8))
			wl_fail("signal %d: handler mask differs", sig);
	}
	stack_t now_ss;
	if (sigaltstack(NULL, &now_ss))
		wl_fail("sigaltstack: %s", strerror(errno));
	else if (now_ss.ss_sp != altstack || now_ss.ss_size != 64 * 1024 || now_ss.ss_flags != 0)
		wl_fail("sigaltstack is %p+%zu flags %d", now_ss.ss_sp, now_ss.ss_size, now_ss.ss_flags);

	sigset_t mask_now, pending;
	sigprocmask(SIG_SETMASK, NULL, &mask_now);
	if (memcmp(&mask_now, &blocked, 8))
		wl_fail("blocked mask differs");
	sigpending(&pending);
	if (!sigismember(&pending, QUEUED))
		wl_fail("queued signal %d is no longer pending", QUEUED);
	if (!sigismember(&pending, SIGWINCH))
		wl_fail("SIGWINCH is no longer pending");
	if (queued_count || got_winch)
		wl_fail("a blocked signal was delivered");

	sigset_t unblock;
	sigemptyset(&unblock);
	sigaddset(&unblock, QUEUED);
	sigaddset(&unblock, SIGWINCH);
	sigprocmask(SIG_UNBLOCK, &unblock, NULL);
	if (queued_count != 2)
		wl_fail("%d queued signals delivered, expected 2", queued_count);
	else {
		if (queued_values[0] != 4242 || queued_values[1] != 4343)
			wl_fail("queued values %d, %d; expected 4242, 4343", queued_values[0], queued_values[1]);
		for (int i = 0; i < 2; i++)
			if (queued_pid[i] != getpid() || queued_code[i] != SI_QUEUE)
				wl_fail("queued signal %d: si_pid %d si_code %d", i, queued_pid[i], queued_code[i]);
	}
	if (got_winch != 1)
		wl_fail("SIGWINCH delivered %d times", got_winch);

	/* the handlers still work as set: SA_RESETHAND drops the SIGHUP handler after one use */
	raise(SIGTERM);
	raise(SIGHUP);
	struct sigaction hup;
	sigaction(SIGHUP, NULL, &hup);
	if (got_term != 1 || got_hup != 1 || hup.sa_handler != SIG_DFL)
		wl_fail("handlers after restore: term %d hup %d hup handler %p", got_term, got_hup, (void *)hup.sa_handler);
	raise(SIGINT); /* ignored */
	wl_finish();
}
