/* A pipe whose other end stays outside the dumped process: its stdout is the write end of a
 * pipe the harness reads. It writes "before" at start, and "after PID" once SIGUSR2 comes
 * (after the restore, through the pipe end the restore was given with --inherit-fd). */
#include "workload.h"

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	struct stat st;
	if (fstat(1, &st) || !S_ISFIFO(st.st_mode))
		wl_die("stdout is not a pipe");
	if (write(1, "before\n", 7) != 7)
		wl_die("write before");
	wl_ready();
	wl_wait_sleeping();
	char line[64];
	int n = snprintf(line, sizeof line, "after %d\n", (int)getpid());
	if (write(1, line, (size_t)n) != n)
		wl_fail("write into the inherited pipe: errno %d", errno);
	if (fstat(1, &st) || !S_ISFIFO(st.st_mode))
		wl_fail("stdout is no longer a pipe");
	wl_finish();
}
