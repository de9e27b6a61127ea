/* An unprivileged process: supplementary groups set, all uids and gids 65534, every capability
 * dropped (bounding set included) and no_new_privs. After the restore all of it must be the same,
 * and the process must still be unable to do what root can. */
#include "workload.h"

#include <grp.h>
#include <sys/prctl.h>

static char caps_before[5][64];
static const char *cap_keys[5] = { "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb" };

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	for (int cap = 0; cap <= 63; cap++)
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) && errno != EINVAL)
			wl_die("PR_CAPBSET_DROP");
	gid_t groups[2] = { 65534, 100 };
	if (setgroups(2, groups))
		wl_die("setgroups");
	if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
		wl_die("setresuid/setresgid");
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		wl_die("PR_SET_NO_NEW_PRIVS");
	/* changing uid made the process non-dumpable; the restore must bring back whatever it is */
	int dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
	for (int i = 0; i < 5; i++)
		if (wl_status_field(cap_keys[i], caps_before[i], sizeof caps_before[i]))
			wl_die("read capabilities");
	wl_ready();
	wl_wait_sleeping();

	uid_t r, e, s;
	gid_t rg, eg, sg;
	getresuid(&r, &e, &s);
	getresgid(&rg, &eg, &sg);
	if (r != 65534 || e != 65534 || s != 65534)
		wl_fail("uids %u/%u/%u", r, e, s);
	if (rg != 65534 || eg != 65534 || sg != 65534)
		wl_fail("gids %u/%u/%u", rg, eg, sg);
	gid_t now_groups[16];
	int n = getgroups(16, now_groups);
	/* the kernel keeps the list sorted */
	if (n != 2 || now_groups[0] != 100 || now_groups[1] != 65534)
		wl_fail("%d supplementary groups, expected 100 and 65534", n);
	for (int i = 0; i < 5; i++) {
		char now[64];
		if (wl_status_field(cap_keys[i], now, sizeof now) || strcmp(now, caps_before[i]))
			wl_fail("%s is %s, was %s", cap_keys[i], now, caps_before[i]);
	}
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		wl_fail("no_new_privs is gone");
	if (prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != dumpable)
		wl_fail("dumpable is %d, was %d", prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), dumpable);
	if (setresuid(0, 0, 0) == 0)
		wl_fail("setresuid(0) succeeded: the process is privileged again");
	wl_finish();
}
