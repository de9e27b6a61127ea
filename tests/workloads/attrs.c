/* Process attributes beyond memory and files: the executable, cmdline, environment and auxv,
 * the mm layout fields of /proc/self/stat, name, nice value, scheduling policy, personality,
 * THP-disable, child-subreaper and oom_score_adj. CPU affinity and timer slack have no place in
 * CRIU's images: they are left at their defaults here and must come back as such (the restorer
 * pins itself to one CPU while it works, and that must not leak into the process). */
#include "workload.h"

#include <sched.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>

struct snapshot {
	char exe[4096];
	char cmdline[4096];
	ssize_t cmdline_len;
	char environ[16384];
	ssize_t environ_len;
	char auxv[4096];
	ssize_t auxv_len;
	char mm_fields[512];
	char comm[32];
	int nice;
	int policy;
	cpu_set_t affinity;
	int personality;
	long timerslack;
	int thp_disable;
	int subreaper;
	char oom[32];
};

static struct snapshot before, after;

/* Fields 26-28 and 45-51 of /proc/self/stat: code, stack, data, brk, args and environment. */
static void mm_fields(char *out, size_t size)
{
	char stat[4096];
	out[0] = 0;
	if (wl_read_file("/proc/self/stat", stat, sizeof stat) < 0)
		return;
	char *p = strrchr(stat, ')');
	if (!p)
		return;
	p += 2; /* field 3 starts here */
	size_t len = 0;
	int field = 3;
	for (char *tok = strtok(p, " \n"); tok; tok = strtok(NULL, " \n"), field++)
		if ((field >= 26 && field <= 28) || (field >= 45 && field <= 51))
			len += (size_t)snprintf(out + len, size - len, "%d=%s ", field, tok);
}

static void take(struct snapshot *s)
{
	ssize_t n = readlink("/proc/self/exe", s->exe, sizeof s->exe - 1);
	s->exe[n > 0 ? n : 0] = 0;
	s->cmdline_len = wl_read_file("/proc/self/cmdline", s->cmdline, sizeof s->cmdline);
	s->environ_len = wl_read_file("/proc/self/environ", s->environ, sizeof s->environ);
	s->auxv_len = wl_read_file("/proc/self/auxv", s->auxv, sizeof s->auxv);
	mm_fields(s->mm_fields, sizeof s->mm_fields);
	prctl(PR_GET_NAME, s->comm);
	errno = 0;
	s->nice = getpriority(PRIO_PROCESS, 0);
	s->policy = sched_getscheduler(0);
	CPU_ZERO(&s->affinity);
	sched_getaffinity(0, sizeof s->affinity, &s->affinity);
	s->personality = personality(0xffffffff);
	s->timerslack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
	s->thp_disable = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
	prctl(PR_GET_CHILD_SUBREAPER, &s->subreaper, 0, 0, 0);
	wl_read_file("/proc/self/oom_score_adj", s->oom, sizeof s->oom);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	prctl(PR_SET_NAME, "attrs-renamed");
	if (setpriority(PRIO_PROCESS, 0, 7))
		wl_die("setpriority");
	struct sched_param sp = { .sched_priority = 0 };
	if (sched_setscheduler(0, SCHED_BATCH, &sp))
		wl_die("sched_setscheduler");
	if (personality(PER_LINUX | UNAME26) < 0)
		wl_die("personality");
	if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) || prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))
		wl_die("prctl");
	int fd = open("/proc/self/oom_score_adj", O_WRONLY);
	if (fd < 0 || write(fd, "123", 3) != 3)
		wl_die("oom_score_adj");
	close(fd);
	take(&before);
	wl_ready();
	wl_wait_sleeping();
	take(&after);

	if (strcmp(before.exe, after.exe))
		wl_fail("exe is '%s', was '%s'", after.exe, before.exe);
	if (before.cmdline_len != after.cmdline_len || memcmp(before.cmdline, after.cmdline, (size_t)before.cmdline_len))
		wl_fail("cmdline differs");
	if (before.environ_len != after.environ_len || memcmp(before.environ, after.environ, (size_t)before.environ_len))
		wl_fail("environ differs");
	if (before.auxv_len != after.auxv_len || memcmp(before.auxv, after.auxv, (size_t)before.auxv_len))
		wl_fail("auxv differs");
	if (strcmp(before.mm_fields, after.mm_fields))
		wl_fail("mm fields of /proc/self/stat are '%s', were '%s'", after.mm_fields, before.mm_fields);
	if (strcmp(before.comm, after.comm))
		wl_fail("name '%s', was '%s'", after.comm, before.comm);
	if (before.nice != after.nice)
		wl_fail("nice %d, was %d", after.nice, before.nice);
	if (before.policy != after.policy)
		wl_fail("scheduling policy %d, was %d", after.policy, before.policy);
	if (!CPU_EQUAL(&before.affinity, &after.affinity))
		wl_fail("CPU affinity: %d CPUs, was %d", CPU_COUNT(&after.affinity), CPU_COUNT(&before.affinity));
	if (before.personality != after.personality)
		wl_fail("personality %#x, was %#x", after.personality, before.personality);
	if (before.timerslack != after.timerslack)
		wl_fail("timer slack %ld, was %ld", after.timerslack, before.timerslack);
	if (before.thp_disable != after.thp_disable)
		wl_fail("THP disable %d, was %d", after.thp_disable, before.thp_disable);
	if (before.subreaper != after.subreaper)
		wl_fail("child subreaper %d, was %d", after.subreaper, before.subreaper);
	if (strcmp(before.oom, after.oom))
		wl_fail("oom_score_adj %s, was %s", after.oom, before.oom);
	/* an ordinary fork and exec still work */
	pid_t child = fork();
	if (child == 0) {
		execl("/bin/sh", "sh", "-c", "exit 7", (char *)NULL);
		_exit(99);
	}
	int status = 0;
	if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 7)
		wl_fail("fork and exec of /bin/sh gave status %#x", status);
	wl_finish();
}
