/* A process tree whose every process checks its private memory, for post-copy of trees:
 *
 *   lazy_tree --ready F --result F [--mib 4] [--children 2]
 *
 *   root R: region A (--mib MiB), filled with pattern 1
 *   +- child k (k = 1..--children): rewrites the first half of its copy of A (pattern 10+k;
 *   |  the second half stays shared copy-on-write with R), then maps region B_k (20+k)
 *   |  +- grandchild G (under child 1 only): rewrites the second half of its copy of B_1
 *   |     (pattern 30), then maps region C (31)
 *
 * So the processes hold pages of equal addresses with different contents, some pages still
 * shared with their parent, and regions of their own. The ready file lists every pid
 * (R=.. c1=.. g=..) and where region A starts (A=0x..., the same in every process). After SIGUSR2, every process passes the signal on to its children,
 * checks every word of its regions, reaps its children and exits 0 only if it and everything
 * below it are intact; R writes the verdict. */
#include "workload.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define MAX_REGIONS 4
#define MAX_KIDS 16

struct region {
	uint64_t *words;
	size_t len; /* bytes */
	unsigned seed[2]; /* of the first and second half */
};

static struct region regions[MAX_REGIONS];
static int nregions;
static pid_t kids[MAX_KIDS];
static int nkids;
static size_t region_len;
static int ready_r = -1, ready_w = -1;

static uint64_t word_of(unsigned seed, size_t i)
{
	return ((uint64_t)seed << 48) ^ ((uint64_t)i * 0x9E3779B97F4A7C15ull);
}

static void fill_half(struct region *r, int half, unsigned seed)
{
	size_t n = r->len / sizeof(uint64_t) / 2;
	size_t from = half ? n : 0;
	for (size_t i = from; i < from + n; i++)
		r->words[i] = word_of(seed, i);
	r->seed[half] = seed;
}

static struct region *new_region(unsigned seed)
{
	if (nregions == MAX_REGIONS)
		wl_die("too many regions");
	struct region *r = &regions[nregions++];
	r->len = region_len;
	r->words = mmap(NULL, region_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (r->words == MAP_FAILED)
		wl_die("mmap a region");
	fill_half(r, 0, seed);
	fill_half(r, 1, seed);
	return r;
}

/* Number of words of the regions that differ from what this process wrote or inherited. */
static size_t check_regions(void)
{
	size_t bad = 0;
	for (int k = 0; k < nregions; k++) {
		struct region *r = &regions[k];
		size_t n = r->len / sizeof(uint64_t);
		for (size_t i = 0; i < n; i++)
			if (r->words[i] != word_of(r->seed[i >= n / 2], i))
				bad++;
	}
	return bad;
}

/* Passes SIGUSR2 on, checks, reaps the children; 0 if everything here and below is intact. */
static int check_tree(const char *name, char *why, size_t size)
{
	for (int k = 0; k < nkids; k++)
		kill(kids[k], SIGUSR2);
	int ok = 1;
	size_t bad = check_regions();
	if (bad) {
		ok = 0;
		snprintf(why, size, "%s (pid %d): %zu words of its memory differ", name, getpid(), bad);
	}
	for (int k = 0; k < nkids; k++) {
		int status;
		while (waitpid(kids[k], &status, 0) < 0) {
			if (errno != EINTR) {
				status = -1;
				break;
			}
		}
		if (status != 0) {
			if (ok)
				snprintf(why, size, "%s: child %d ended with status %#x", name, kids[k], status);
			ok = 0;
		}
	}
	return ok;
}

static pid_t spawn(void (*body)(int), int arg)
{
	if (nkids == MAX_KIDS)
		wl_die("too many children");
	pid_t pid = fork();
	if (pid < 0)
		wl_die("fork");
	if (pid == 0) {
		nkids = 0;
		if (ready_r >= 0)
			close(ready_r);
		ready_r = -1;
		body(arg);
		_exit(2);
	}
	kids[nkids++] = pid;
	return pid;
}

/* Tells the root this process is set up: its name and pid. */
static void announce(char tag, int k)
{
	int32_t msg[2] = { (int32_t)(tag << 8 | k), getpid() };
	if (write(ready_w, msg, sizeof msg) != (ssize_t)sizeof msg)
		wl_die("announce");
	close(ready_w);
}

static void descendant_wait_and_check(const char *name)
{
	wl_wait_sleeping();
	char why[256] = "";
	_exit(check_tree(name, why, sizeof why) ? 0 : 1);
}

static void grandchild(int k)
{
	(void)k;
	fill_half(&regions[1], 1, 30);
	new_region(31);
	announce('g', 0);
	descendant_wait_and_check("grandchild");
}

static void child(int k)
{
	fill_half(&regions[0], 0, 10 + (unsigned)k);
	new_region(20 + (unsigned)k);
	if (k == 1)
		spawn(grandchild, 0);
	announce('c', k);
	char name[32];
	snprintf(name, sizeof name, "child %d", k);
	descendant_wait_and_check(name);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	region_len = (size_t)wl_opt_long("--mib", 4) << 20;
	long children = wl_opt_long("--children", 2);
	if (children < 1 || children >= MAX_KIDS)
		wl_die("--children out of range");
	int ready[2];
	if (pipe2(ready, O_CLOEXEC))
		wl_die("pipe");
	ready_r = ready[0];
	ready_w = ready[1];
	new_region(1);
	for (int k = 1; k <= children; k++)
		spawn(child, k);
	close(ready[1]);
	char text[1024];
	size_t len = (size_t)snprintf(text, sizeof text, "R=%d A=%p", getpid(), (void *)regions[0].words);
	/* Every child and the grandchild: set up once each has said so. */
	for (long n = 0; n < children + 1; n++) {
		int32_t msg[2];
		ssize_t got = read(ready[0], msg, sizeof msg);
		if (got != (ssize_t)sizeof msg)
			wl_die("read an announcement");
		if ((msg[0] >> 8) == 'g')
			len += (size_t)snprintf(text + len, sizeof text - len, " g=%d", msg[1]);
		else
			len += (size_t)snprintf(text + len, sizeof text - len, " c%d=%d", msg[0] & 0xff, msg[1]);
		if (len >= sizeof text)
			wl_die("ready text too long");
	}
	close(ready[0]);
	snprintf(text + len, sizeof text - len, "\n");
	wl_ready_with(text);
	wl_wait_sleeping();
	char why[256] = "";
	if (!check_tree("root", why, sizeof why))
		wl_fail("%s", why);
	wl_finish();
}
