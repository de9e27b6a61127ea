/* A listening socket and a locked file shared by a parent and its child (inherited through
 * fork): after restore they must still be one socket and one open file description.
 *
 * The parent listens on 127.0.0.1 (fd 10) and holds an flock on
 * "locked" through fd 11; then it forks. The ready file holds "PORT CHILD_PID". After SIGUSR2 the parent passes the signal on; the
 * child accepts one connection on the inherited listener, answers "child" and exits; the
 * parent checks that the flock still keeps a new open file description out and that its
 * child ended well. */
#include "workload.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/wait.h>

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096], path[4200];
	wl_dir(dir, sizeof dir);

	int s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in lo;
	memset(&lo, 0, sizeof lo);
	lo.sin_family = AF_INET;
	lo.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (s < 0 || dup2(s, 10) != 10 || bind(10, (struct sockaddr *)&lo, sizeof lo) || listen(10, 3))
		wl_die("listen");
	close(s);
	socklen_t len = sizeof lo;
	if (getsockname(10, (struct sockaddr *)&lo, &len))
		wl_die("getsockname");

	snprintf(path, sizeof path, "%s/locked", dir);
	int f = open(path, O_RDWR | O_CREAT, 0600);
	if (f < 0 || dup2(f, 11) != 11 || flock(11, LOCK_EX | LOCK_NB))
		wl_die("flock");
	close(f);

	pid_t child = fork();
	if (child < 0)
		wl_die("fork");
	if (child == 0) {
		wl_wait_sleeping();
		int c = accept(10, NULL, NULL);
		int ok = c >= 0 && write(c, "child", 5) == 5;
		_exit(ok ? 0 : 1);
	}
	char ready[32];
	snprintf(ready, sizeof ready, "%d %d\n", ntohs(lo.sin_port), (int)child);
	wl_ready_with(ready);
	wl_wait_sleeping();
	kill(child, SIGUSR2);

	int again = open(path, O_RDWR);
	if (again < 0 || flock(again, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
		wl_fail("the shared flock is no longer held (errno %d)", errno);
	int status;
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status))
		wl_fail("the child did not serve on the shared listener (status %#x)", status);
	wl_finish();
}
