/* Lowered resource limits (soft and hard) must come back exactly, for all of them. */
#include "workload.h"

#include <sys/resource.h>

static struct rlimit before[RLIM_NLIMITS];

static void lower(int resource, rlim_t soft, rlim_t hard)
{
	struct rlimit r = { soft, hard };
	if (setrlimit(resource, &r))
		wl_die("setrlimit");
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	lower(RLIMIT_NOFILE, 200, 400);
	lower(RLIMIT_CORE, 0, 1 << 20);
	lower(RLIMIT_NPROC, 3000, 4000);
	lower(RLIMIT_MSGQUEUE, 4096, 8192);
	lower(RLIMIT_SIGPENDING, 1000, 2000);
	lower(RLIMIT_FSIZE, 1UL << 30, 2UL << 30);
	lower(RLIMIT_CPU, 3600, 7200);
	for (int r = 0; r < RLIM_NLIMITS; r++)
		getrlimit(r, &before[r]);
	wl_ready();
	wl_wait_sleeping();
	for (int r = 0; r < RLIM_NLIMITS; r++) {
		struct rlimit now;
		getrlimit(r, &now);
		if (now.rlim_cur != before[r].rlim_cur || now.rlim_max != before[r].rlim_max)
			wl_fail("rlimit %d is %llu/%llu, was %llu/%llu", r, (unsigned long long)now.rlim_cur,
				(unsigned long long)now.rlim_max, (unsigned long long)before[r].rlim_cur,
				(unsigned long long)before[r].rlim_max);
	}
	wl_finish();
}
