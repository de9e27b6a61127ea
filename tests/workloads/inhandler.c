/* Dumped in the middle of a signal handler running on the alternate signal stack: the signal
 * frame (saved registers and mask) lives on the altstack. After the restore the handler goes on,
 * still sees itself on the altstack, and its return (rt_sigreturn through the restorer) must land
 * back in main with the registers and signal mask main had before the signal. */
#include "workload.h"

#define ALTSTACK_SIZE (64 * 1024)

static char *altstack;
static volatile int in_handler_onstack;
static volatile int handler_done;
static sigset_t mask_in_handler_expected;
static volatile int mask_in_handler_ok;

static void on_usr1(int sig)
{
	(void)sig;
	volatile char marker = 0;
	stack_t ss;
	sigaltstack(NULL, &ss);
	in_handler_onstack = (ss.ss_flags & SS_ONSTACK) && (char *)&marker >= altstack &&
			     (char *)&marker < altstack + ALTSTACK_SIZE;
	wl_ready();
	wl_wait_sleeping();
	/* after the restore: still on the altstack, with the handler's mask */
	sigaltstack(NULL, &ss);
	if (!(ss.ss_flags & SS_ONSTACK))
		in_handler_onstack = 0;
	sigset_t now;
	sigprocmask(SIG_SETMASK, NULL, &now);
	mask_in_handler_ok = !memcmp(&now, &mask_in_handler_expected, 8);
	handler_done = 1;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	altstack = malloc(ALTSTACK_SIZE);
	stack_t ss = { .ss_sp = altstack, .ss_size = ALTSTACK_SIZE, .ss_flags = 0 };
	if (sigaltstack(&ss, NULL))
		wl_die("sigaltstack");
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_ONSTACK;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGRTMIN + 4);
	if (sigaction(SIGUSR1, &sa, NULL))
		wl_die("sigaction");

	sigset_t main_mask;
	sigemptyset(&main_mask);
	sigaddset(&main_mask, SIGWINCH);
	sigprocmask(SIG_SETMASK, &main_mask, NULL);
	mask_in_handler_expected = main_mask;
	sigaddset(&mask_in_handler_expected, SIGUSR1);
	sigaddset(&mask_in_handler_expected, SIGRTMIN + 4);

	/* values held across the signal in callee-saved registers and on main's stack */
	volatile uint64_t on_stack = 0x5eed5eed5eed5eedULL;
	register uint64_t held asm("rbx") = 0xfeedfacecafebeefULL;
	__asm__ volatile("" : "+r"(held));
	raise(SIGUSR1);
	__asm__ volatile("" : "+r"(held));

	if (!handler_done)
		wl_fail("the handler did not finish");
	if (!in_handler_onstack)
		wl_fail("the handler was not on the alternate stack after the restore");
	if (!mask_in_handler_ok)
		wl_fail("the signal mask inside the handler differs");
	sigset_t now;
	sigprocmask(SIG_SETMASK, NULL, &now);
	if (memcmp(&now, &main_mask, 8))
		wl_fail("main's signal mask was not restored by sigreturn");
	if (held != 0xfeedfacecafebeefULL)
		wl_fail("rbx is %#llx after sigreturn", (unsigned long long)held);
	if (on_stack != 0x5eed5eed5eed5eedULL)
		wl_fail("main's stack changed");
	stack_t after;
	sigaltstack(NULL, &after);
	if (after.ss_flags & SS_ONSTACK)
		wl_fail("still on the altstack after the handler returned");
	wl_finish();
}
