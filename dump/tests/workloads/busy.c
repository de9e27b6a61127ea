/* A process with a bit of every kind of state the dump reads. It writes "ready" to argv[1]
 * once set up, then spins; on SIGUSR2 it checks that its own state is unchanged (the CPU
 * affinity of every thread too, which the dumper changes while it injects), writes PASS or
 * FAIL: ... to argv[2] and exits. Used to check that a --leave-running dump, and a dump that
 * fails on purpose, leave the process exactly as it was. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define NTHREADS 3
#define BIG (64 << 20)

static volatile sig_atomic_t got_usr2;
static volatile uint64_t counters[NTHREADS];
static volatile int stop_threads;
static volatile int cpus_changed;
static unsigned char *big;
static char fail[512];

static void on_usr2(int sig) { (void)sig; got_usr2 = 1; }
static void on_usr1(int sig) { (void)sig; }

static void *spin(void *arg)
{
	long i = (long)arg;
	cpu_set_t before, after;
	sched_getaffinity(0, sizeof before, &before);
	while (!stop_threads)
		counters[i]++;
	sched_getaffinity(0, sizeof after, &after);
	if (!CPU_EQUAL(&before, &after))
		cpus_changed = 1;
	return NULL;
}

static void check(int ok, const char *what)
{
	if (!ok && !fail[0])
		snprintf(fail, sizeof fail, "FAIL: %s", what);
}

static void write_file(const char *path, const char *text)
{
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f) exit(2);
	fputs(text, f);
	fclose(f);
	rename(tmp, path);
}

int main(int argc, char **argv)
{
	if (argc < 3) return 2;
	/* Only what this program opens itself: fds inherited from whoever started it would be
	 * pipes or sockets the dump rightly refuses. */
	syscall(SYS_close_range, 3, ~0U, 0);
	/* memory of every kind */
	big = mmap(NULL, BIG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (size_t i = 0; i < BIG; i += 4096) big[i] = (unsigned char)(i >> 12);
	unsigned char *ro = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(ro, 0x5a, 8192);
	mprotect(ro, 8192, PROT_READ);
	unsigned char *none = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	none[0] = 0x77;
	mprotect(none, 4096, PROT_NONE);
	char *guard = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	guard[0] = 1;
	madvise(guard + 4096, 4096, 102 /* MADV_GUARD_INSTALL */);
	char *heap = malloc(1 << 20);
	memset(heap, 0x33, 1 << 20);

	/* files */
	int wfd = open("data.txt", O_RDWR | O_CREAT | O_TRUNC, 0640);
	write(wfd, "hello world\n", 12);
	lseek(wfd, 6, SEEK_SET);
	int afd = open("log.txt", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	write(afd, "line\n", 5);
	int gfd = open("ghost.txt", O_RDWR | O_CREAT | O_TRUNC, 0600);
	write(gfd, "deleted but open\n", 17);
	unlink("ghost.txt");
	int nfd = open("/dev/null", O_WRONLY);
	umask(027);

	/* signals */
	struct sigaction sa = {0};
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART | SA_ONSTACK;
	sigaddset(&sa.sa_mask, SIGINT);
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	static char altstack[65536];
	stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
	sigaltstack(&ss, NULL);
	sigset_t blocked;
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGRTMIN + 2);
	sigprocmask(SIG_BLOCK, &blocked, NULL);
	union sigval sv = {.sival_int = 4242};
	sigqueue(getpid(), SIGRTMIN + 2, sv);
	struct itimerval it = {.it_interval = {100, 0}, .it_value = {100, 0}};
	setitimer(ITIMER_REAL, &it, NULL);
	signal(SIGALRM, SIG_IGN);
	timer_t tid;
	struct sigevent sev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR1};
	timer_create(CLOCK_MONOTONIC, &sev, &tid);
	struct itimerspec its = {.it_value = {200, 0}};
	timer_settime(tid, 0, &its, NULL);
	struct rlimit rl = {.rlim_cur = 512, .rlim_max = 1024};
	setrlimit(RLIMIT_NOFILE, &rl);
	prctl(PR_SET_NAME, "busy-work");

	/* A filter that kills the process on personality(), which the dumper injects: the dump
	 * must get past it (PTRACE_O_SUSPEND_SECCOMP). The program never calls it itself. */
	struct sock_filter insns[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_personality, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {.len = sizeof insns / sizeof insns[0], .filter = insns};
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) return 3;

	pthread_t th[NTHREADS];
	for (long i = 0; i < NTHREADS; i++) pthread_create(&th[i], NULL, spin, (void *)i);

	cpu_set_t cpus_before, cpus_after;
	sched_getaffinity(0, sizeof cpus_before, &cpus_before);
	write_file(argv[1], "ready\n");
	while (!got_usr2) {
		/* keep some registers busy with a known value */
		__asm__ volatile("" ::: "memory");
	}
	stop_threads = 1;
	for (int i = 0; i < NTHREADS; i++) pthread_join(th[i], NULL);
	sched_getaffinity(0, sizeof cpus_after, &cpus_after);
	check(CPU_EQUAL(&cpus_before, &cpus_after) && !cpus_changed, "cpu affinity");

	for (size_t i = 0; i < BIG; i += 4096) if (big[i] != (unsigned char)(i >> 12)) { check(0, "big memory"); break; }
	check(ro[8191] == 0x5a, "read-only memory");
	mprotect(none, 4096, PROT_READ);
	check(none[0] == 0x77, "PROT_NONE memory");
	check(heap[12345] == 0x33, "heap");
	check(lseek(wfd, 0, SEEK_CUR) == 6, "file position");
	char buf[64] = {0};
	check(pread(gfd, buf, 17, 0) == 17 && !memcmp(buf, "deleted but open\n", 17), "deleted file contents");
	check(fcntl(afd, F_GETFL) & O_APPEND, "O_APPEND");
	check(fcntl(afd, F_GETFD) & FD_CLOEXEC, "FD_CLOEXEC");
	check(write(nfd, "x", 1) == 1, "/dev/null");
	mode_t old = umask(0);
	check(old == 027, "umask");
	sigset_t now;
	sigprocmask(SIG_BLOCK, NULL, &now);
	check(sigismember(&now, SIGRTMIN + 2), "blocked mask");
	sigset_t pend;
	sigpending(&pend);
	check(sigismember(&pend, SIGRTMIN + 2), "pending signal");
	struct sigaction cur;
	sigaction(SIGUSR1, NULL, &cur);
	check(cur.sa_handler == on_usr1 && (cur.sa_flags & SA_ONSTACK) && sigismember(&cur.sa_mask, SIGINT), "SIGUSR1 handler");
	stack_t oss;
	sigaltstack(NULL, &oss);
	check(oss.ss_sp == altstack && oss.ss_size == sizeof altstack, "sigaltstack");
	struct itimerval cit;
	getitimer(ITIMER_REAL, &cit);
	check(cit.it_interval.tv_sec == 100 && cit.it_value.tv_sec <= 100 && cit.it_value.tv_sec > 50, "itimer");
	struct itimerspec cits;
	timer_gettime(tid, &cits);
	check(cits.it_value.tv_sec <= 200 && cits.it_value.tv_sec > 100, "posix timer");
	getrlimit(RLIMIT_NOFILE, &rl);
	check(rl.rlim_cur == 512 && rl.rlim_max == 1024, "rlimit");
	char name[32] = {0};
	prctl(PR_GET_NAME, name);
	check(!strcmp(name, "busy-work"), "comm");
	for (int i = 0; i < NTHREADS; i++) check(counters[i] > 0, "thread counters");
	check(prctl(PR_GET_SECCOMP) == 2, "seccomp mode");
	check(prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1, "no_new_privs");
	write_file(argv[2], fail[0] ? fail : "PASS");
	return fail[0] ? 1 : 0;
}
