/* Shared memory across a process tree: a MAP_SHARED|MAP_ANONYMOUS region, a memfd mapped
 * shared and writable before F_SEAL_FUTURE_WRITE was added, and a SysV segment, all inherited
 * by a child that answers requests through them. The ready file says "child=PID id=SEGID".
 * After restore the parent changes values in the memfd and the segment and asks the child
 * through the anonymous region; the child's answer and its stores must come back through
 * all three, the memfd keeps its seals (a write() is refused, the old mapping still writes),
 * and the segment is removed at the end. */
#include "workload.h"

#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/wait.h>

#define PAGE 4096UL
#define STOP 0xffffffffu

static volatile uint32_t *req;
static volatile unsigned char *mf, *sv;

/* Serves requests until told to stop, or until its parent is gone (a failed test must
 * leave nothing behind). */
static void child_loop(pid_t parent)
{
	uint32_t seen = 0;
	for (;;) {
		uint32_t n = req[0];
		if (n == STOP)
			_exit(0);
		if (getppid() != parent)
			_exit(1);
		if (n && n != seen) {
			mf[200] = (unsigned char)n;
			sv[200] = (unsigned char)n;
			req[1] = n + mf[100] + sv[100];
			seen = n;
		}
		struct timespec ts = { 0, 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
}

/* Asks the child for N; returns its answer, or 0 after a second without one. */
static uint32_t ask(uint32_t n, uint32_t want)
{
	req[0] = n;
	for (int i = 0; i < 1000 && req[1] != want; i++)
		usleep(1000);
	return req[1];
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	req = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	int fd = memfd_create("ckpt-tree", MFD_ALLOW_SEALING);
	if (req == MAP_FAILED || fd < 0 || ftruncate(fd, 2 * PAGE))
		wl_die("shared anonymous memory or memfd");
	mf = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mf == MAP_FAILED)
		wl_die("mmap memfd");
	if (fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_GROW))
		wl_die("F_ADD_SEALS");
	int id = shmget((key_t)(0x5d000000 | (getpid() & 0xffffff)), 3 * PAGE, IPC_CREAT | IPC_EXCL | 0600);
	if (id < 0)
		wl_die("shmget");
	sv = shmat(id, NULL, 0);
	if (sv == (void *)-1) {
		shmctl(id, IPC_RMID, NULL);
		wl_die("shmat");
	}
	mf[100] = 7;
	sv[100] = 9;
	pid_t parent = getpid();
	pid_t child = fork();
	if (child < 0) {
		shmctl(id, IPC_RMID, NULL);
		wl_die("fork");
	}
	if (child == 0)
		child_loop(parent);
	if (ask(5, 5 + 7 + 9) != 21)
		wl_fail("before the dump the child did not answer");
	char ready[64];
	snprintf(ready, sizeof ready, "child=%d id=%d\n", (int)child, id);
	wl_ready_with(ready);
	wl_wait_sleeping();

	mf[100] = 11;
	sv[100] = 13;
	uint32_t got = ask(42, 42 + 11 + 13);
	if (got != 66)
		wl_fail("the child answered %u, expected 66", got);
	if (mf[200] != 42)
		wl_fail("the child's store through the memfd shows %u", mf[200]);
	if (sv[200] != 42)
		wl_fail("the child's store through the SysV segment shows %u", sv[200]);
	int seals = fcntl(fd, F_GET_SEALS);
	if (seals != (F_SEAL_FUTURE_WRITE | F_SEAL_GROW))
		wl_fail("memfd seals are %#x", seals);
	if (pwrite(fd, "x", 1, 0) == 1 || errno != EPERM)
		wl_fail("a write() to the memfd sealed against writes succeeded");
	req[0] = STOP;
	int status = 0;
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status))
		wl_fail("the child did not exit cleanly (%#x)", status);
	shmctl(id, IPC_RMID, NULL);
	wl_finish();
}
