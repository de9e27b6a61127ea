/* A seccomp filter that kills the process on getitimer and get_robust_list, two system calls a
 * dumper has to run in the target to read its state. The dump must not trip it, and after the
 * restore the filter must still be there and still kill (checked in a forked child). */
#include "workload.h"

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>

static int install(void)
{
	struct sock_filter code[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getitimer, 2, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_get_robust_list, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
	};
	struct sock_fprog prog = { .len = sizeof code / sizeof code[0], .filter = code };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		return -1;
	return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

/* Runs getitimer in a child: the filter must kill it with SIGSYS. */
static void check_filter_kills(const char *when)
{
	pid_t child = fork();
	if (child == 0) {
		struct itimerval it;
		syscall(SYS_getitimer, ITIMER_REAL, &it);
		_exit(0);
	}
	int status = 0;
	if (child < 0 || waitpid(child, &status, 0) != child)
		wl_fail("%s: fork/wait failed", when);
	else if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGSYS)
		wl_fail("%s: getitimer did not kill the child (status %#x)", when, status);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	if (install())
		wl_die("seccomp");
	check_filter_kills("before the dump");
	char mode_before[32], filters_before[32];
	wl_status_field("Seccomp", mode_before, sizeof mode_before);
	wl_status_field("Seccomp_filters", filters_before, sizeof filters_before);
	wl_ready();
	wl_wait_sleeping();
	char mode[32] = "?", filters[32] = "?";
	wl_status_field("Seccomp", mode, sizeof mode);
	wl_status_field("Seccomp_filters", filters, sizeof filters);
	if (strcmp(mode, mode_before) || strcmp(filters, filters_before))
		wl_fail("seccomp mode %s with %s filters, was %s with %s", mode, filters, mode_before, filters_before);
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		wl_fail("no_new_privs is gone");
	check_filter_kills("after the restore");
	wl_finish();
}
