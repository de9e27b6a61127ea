/* The working directory (a directory whose name has spaces) and the umask. */
#include "workload.h"

#include <sys/stat.h>

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096], cwd[4200], now[4200];
	wl_dir(dir, sizeof dir);
	snprintf(cwd, sizeof cwd, "%s/work dir", dir);
	if (mkdir(cwd, 0755) || chdir(cwd))
		wl_die("mkdir/chdir");
	umask(0027);
	/* chdir with a relative path: the kernel's cwd is what counts, not a string we kept */
	if (chdir("."))
		wl_die("chdir");
	wl_ready();
	wl_wait_sleeping();
	if (!getcwd(now, sizeof now))
		wl_fail("getcwd: %s", strerror(errno));
	else if (strcmp(now, cwd))
		wl_fail("cwd is '%s', was '%s'", now, cwd);
	mode_t mask = umask(0);
	if (mask != 0027)
		wl_fail("umask %#o, was 027", (unsigned)mask);
	/* a relative open lands in the same directory */
	int fd = open("probe", O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
	char probe[4300];
	snprintf(probe, sizeof probe, "%s/probe", cwd);
	struct stat st;
	if (fd < 0 || stat(probe, &st))
		wl_fail("a relative open did not land in the old cwd");
	wl_finish();
}
