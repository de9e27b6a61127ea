/* A terminal job: stdin and stdout are a pseudo-terminal the test holds the other end of, with
 * echo turned off. Dumped and restored with --shell-job, the process must find the same terminal
 * on the same fds, with the same settings. */
#include "workload.h"

#include <termios.h>

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	if (!isatty(0) || !isatty(1))
		wl_die("stdin and stdout must be a terminal");
	struct termios before, now;
	if (tcgetattr(0, &before))
		wl_die("tcgetattr");
	before.c_lflag &= ~(tcflag_t)ECHO;
	if (tcsetattr(0, TCSANOW, &before) || tcgetattr(0, &before))
		wl_die("tcsetattr");
	char name_before[256], name_now[256];
	snprintf(name_before, sizeof name_before, "%s", ttyname(0) ? ttyname(0) : "?");
	/* O_LARGEFILE depends on how the fd was opened (by path: set; from the master with
	 * TIOCGPTPEER: not) and means nothing on 64-bit: leave it out. */
	int fl_before = fcntl(0, F_GETFL) & ~0100000;
	wl_ready();
	wl_wait_sleeping();

	if (!isatty(0) || !isatty(1))
		wl_fail("stdin or stdout is no longer a terminal");
	snprintf(name_now, sizeof name_now, "%s", ttyname(0) ? ttyname(0) : "?");
	if (strcmp(name_now, name_before))
		wl_fail("stdin is %s, was %s", name_now, name_before);
	int fl_now = fcntl(0, F_GETFL) & ~0100000;
	if (fl_now != fl_before)
		wl_fail("stdin flags %#o, were %#o", fl_now, fl_before);
	if (tcgetattr(0, &now))
		wl_fail("tcgetattr: %s", strerror(errno));
	else if (now.c_lflag != before.c_lflag || now.c_iflag != before.c_iflag || now.c_oflag != before.c_oflag)
		wl_fail("terminal settings changed (lflag %#x, was %#x)", now.c_lflag, before.c_lflag);
	if (write(1, "still here\n", 11) != 11)
		wl_fail("cannot write to the terminal: %s", strerror(errno));
	wl_finish();
}
