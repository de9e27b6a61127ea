/* A process blocked in vfork: its child shares its memory and never execs. */
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <unistd.h>

int main(void)
{
	/* Whatever the harness left open (a build jobserver's pipe) is not ours to keep. */
	syscall(SYS_close_range, 3, ~0U, 0);
	pid_t child = vfork();
	if (child == 0)
		for (;;)
			pause();
	for (;;)
		pause();
}
