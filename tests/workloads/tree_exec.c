/* Runs a program with nothing open but stdin, stdout and stderr:
 *
 *   tree_exec PROGRAM [ARGS...]
 *
 * Programs that are not ours (redis-server, bash) do not close what their launcher leaked (a
 * test runner's pipes, say), and an end of a pipe held outside the dumped tree is a dump error.
 * This closes every other descriptor and execs PROGRAM in the same process. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s PROGRAM [ARGS...]\n", argv[0]);
		return 2;
	}
	if (close_range(3, ~0U, 0)) {
		fprintf(stderr, "close_range: %s\n", strerror(errno));
		return 2;
	}
	execvp(argv[1], argv + 1);
	fprintf(stderr, "exec %s: %s\n", argv[1], strerror(errno));
	return 127;
}
