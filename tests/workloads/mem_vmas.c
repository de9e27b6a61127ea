/* Memory of every VMA kind: anonymous private (with holes), a private file mapping with COWed
 * pages, read-only and PROT_NONE memory with contents, a guard region, MAP_GROWSDOWN, the stack,
 * the heap, a sparse region, a transparent-huge-page region and regions with madvise flags.
 * After the restore the layout (/proc/self/maps) must be identical, every region must keep its
 * VmFlags (protection, growsdown, madvise bits) and every byte must be as it was. */
#include "workload.h"

#include <sys/mman.h>
#include <sys/wait.h>

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif

#define PAGE 4096UL

static char maps_before[65536];
static char smaps_text[1 << 20];

/* Regions whose VmFlags (smaps) are compared, found by an address inside them. */
struct region {
	const char *name;
	void *start;
	char flags_before[128];
};
static struct region regions[16];
static int nregions;

static void track(const char *name, void *start)
{
	regions[nregions].name = name;
	regions[nregions].start = start;
	nregions++;
}

/* The VmFlags line of the VMA holding ADDR, from the smaps text read last. */
static int vm_flags(void *addr, char *out, size_t size)
{
	unsigned long a = (unsigned long)addr;
	for (char *line = smaps_text; line && *line;) {
		unsigned long start, end;
		if (sscanf(line, "%lx-%lx ", &start, &end) == 2 && start <= a && a < end) {
			char *flags = strstr(line, "\nVmFlags:");
			if (!flags)
				return -1;
			flags += 9;
			while (*flags == ' ')
				flags++;
			/* Copy the flags but "ac" (VM_ACCOUNT): overcommit bookkeeping that depends on
			 * whether a private mapping was ever writable, not on what a program sees. */
			size_t len = 0;
			out[0] = 0;
			for (char *f = flags; *f && *f != '\n';) {
				size_t n = strcspn(f, " \n");
				if (n && !(n == 2 && !strncmp(f, "ac", 2)) && len + n + 2 < size) {
					memcpy(out + len, f, n);
					len += n;
					out[len++] = ' ';
					out[len] = 0;
				}
				f += n;
				while (*f == ' ')
					f++;
			}
			return 0;
		}
		line = strchr(line, '\n');
		if (line)
			line++;
	}
	return -1;
}

static char maps_after[65536];

static unsigned char pattern(unsigned long region, unsigned long off)
{
	return (unsigned char)(region * 31 + off * 7 + (off >> 12) * 13 + 1);
}

static void fill(unsigned char *p, size_t len, unsigned long region)
{
	for (size_t i = 0; i < len; i++)
		p[i] = pattern(region, i);
}

static void expect(const char *what, const unsigned char *p, size_t len, unsigned long region)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] != pattern(region, i)) {
			wl_fail("%s: byte %zu is %#x, expected %#x", what, i, p[i], pattern(region, i));
			return;
		}
}

static void expect_zero(const char *what, const unsigned char *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i]) {
			wl_fail("%s: byte %zu is %#x, expected 0", what, i, p[i]);
			return;
		}
}

static void *map(size_t len, int prot, int flags)
{
	void *p = mmap(NULL, len, prot, flags, -1, 0);
	if (p == MAP_FAILED)
		wl_die("mmap");
	return p;
}

static uint64_t pagemap_entry(const void *addr)
{
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	uint64_t e = 0;
	if (fd >= 0) {
		if (pread(fd, &e, sizeof e, (off_t)((uintptr_t)addr / PAGE * 8)) != sizeof e)
			e = 0;
		close(fd);
	}
	return e;
}

struct vma {
	unsigned long start, end, offset, inode;
	char perms[8], dev[16], path[256];
};

/* Parses maps text into VMAs, merging neighbours the kernel may or may not have merged: same
 * protection and file, contiguous addresses and offsets (as CRIU's zdtm compares maps). Whether a
 * restored read-only file VMA merges with its neighbour depends on when its pages were written,
 * which no program can rely on. */
static int parse_maps(char *text, struct vma *out, int max)
{
	int n = 0;
	for (char *line = strtok(text, "\n"); line && n < max; line = strtok(NULL, "\n")) {
		struct vma v;
		memset(&v, 0, sizeof v);
		int pos = 0;
		if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %n", &v.start, &v.end, v.perms, &v.offset, v.dev, &v.inode,
			   &pos) < 6)
			continue;
		snprintf(v.path, sizeof v.path, "%s", pos > 0 ? line + pos : "");
		if (n > 0) {
			struct vma *prev = &out[n - 1];
			int same = prev->end == v.start && !strcmp(prev->perms, v.perms) && !strcmp(prev->dev, v.dev) &&
				   prev->inode == v.inode && !strcmp(prev->path, v.path) &&
				   (v.inode == 0 || prev->offset + (prev->end - prev->start) == v.offset) && v.path[0] != '[';
			if (same) {
				prev->end = v.end;
				continue;
			}
		}
		out[n++] = v;
	}
	return n;
}

static struct vma vmas_before[512], vmas_after[512];

static void compare_maps(void)
{
	int nb = parse_maps(maps_before, vmas_before, 512), na = parse_maps(maps_after, vmas_after, 512);
	for (int i = 0; i < nb || i < na; i++) {
		if (i >= nb || i >= na) {
			wl_fail("%d VMAs before, %d after", nb, na);
			return;
		}
		struct vma *b = &vmas_before[i], *a = &vmas_after[i];
		if (b->start != a->start || b->end != a->end || strcmp(b->perms, a->perms) || b->offset != a->offset ||
		    strcmp(b->dev, a->dev) || b->inode != a->inode || strcmp(b->path, a->path)) {
			wl_fail("maps differ: before %lx-%lx %s %lx %s %lu %s, after %lx-%lx %s %lx %s %lu %s", b->start, b->end,
				b->perms, b->offset, b->dev, b->inode, b->path, a->start, a->end, a->perms, a->offset, a->dev,
				a->inode, a->path);
			return;
		}
	}
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	char dir[4096], path[4200];
	wl_dir(dir, sizeof dir);

	/* anonymous private, pages 3 and 9 never touched */
	size_t anon_len = 16 * PAGE;
	unsigned char *anon = map(anon_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
	for (unsigned long pg = 0; pg < 16; pg++)
		if (pg != 3 && pg != 9)
			fill(anon + pg * PAGE, PAGE, 100 + pg);

	/* private file mapping: pages 1 and 5 COWed, the rest read from the file */
	snprintf(path, sizeof path, "%s/mapped.dat", dir);
	int ffd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (ffd < 0)
		wl_die("open mapped.dat");
	size_t file_len = 8 * PAGE;
	unsigned char *file_content = malloc(file_len);
	fill(file_content, file_len, 7);
	if (write(ffd, file_content, file_len) != (ssize_t)file_len)
		wl_die("write mapped.dat");
	unsigned char *fmap = mmap(NULL, file_len, PROT_READ | PROT_WRITE, MAP_PRIVATE, ffd, 0);
	if (fmap == MAP_FAILED)
		wl_die("mmap mapped.dat");
	close(ffd);
	volatile unsigned char sink = fmap[2 * PAGE]; /* a page read but not written */
	(void)sink;
	fill(fmap + 1 * PAGE, PAGE, 201);
	fill(fmap + 5 * PAGE, PAGE, 205);

	/* read-only anonymous memory with contents */
	unsigned char *ro = map(4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
	fill(ro, 4 * PAGE, 300);
	if (mprotect(ro, 4 * PAGE, PROT_READ))
		wl_die("mprotect ro");

	/* PROT_NONE memory with contents */
	unsigned char *none = map(4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
	fill(none, 4 * PAGE, 400);
	if (mprotect(none, 4 * PAGE, PROT_NONE))
		wl_die("mprotect none");

	/* guard region: page 1 of 4 */
	unsigned char *guarded = map(4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
	fill(guarded, 4 * PAGE, 500);
	int have_guard = madvise(guarded + PAGE, PAGE, MADV_GUARD_INSTALL) == 0;

	/* MAP_GROWSDOWN */
	unsigned char *gd = map(4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN);
	fill(gd + PAGE, 3 * PAGE, 600);

	/* sparse 64 MiB region: one page in 64 touched */
	size_t sparse_len = 64UL << 20;
	unsigned char *sparse = map(sparse_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
	for (size_t off = 0; off < sparse_len; off += 64 * PAGE)
		fill(sparse + off, PAGE, 700 + off / PAGE);

	/* transparent huge pages: a 2 MiB-aligned 8 MiB region advised MADV_HUGEPAGE */
	size_t thp_len = 8UL << 20;
	unsigned char *thp_raw = map(thp_len + (2UL << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
	unsigned char *thp = (unsigned char *)(((uintptr_t)thp_raw + (2UL << 20) - 1) & ~((2UL << 20) - 1));
	if (madvise(thp, thp_len, MADV_HUGEPAGE))
		wl_die("MADV_HUGEPAGE");
	fill(thp, thp_len, 1000);

	/* madvise bits that show in VmFlags */
	unsigned char *advised = map(8 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
	fill(advised, 8 * PAGE, 1100);
	if (madvise(advised, 8 * PAGE, MADV_DONTFORK) || madvise(advised, 8 * PAGE, MADV_RANDOM) ||
	    madvise(advised, 8 * PAGE, MADV_DONTDUMP) || madvise(advised, 8 * PAGE, MADV_NOHUGEPAGE))
		wl_die("madvise");
	unsigned char *wiped = map(4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
	fill(wiped, 4 * PAGE, 1200);
	if (madvise(wiped, 4 * PAGE, MADV_WIPEONFORK) || madvise(wiped, 4 * PAGE, MADV_SEQUENTIAL))
		wl_die("madvise");

	track("anon", anon);
	track("file mapping", fmap);
	track("read-only", ro);
	track("PROT_NONE", none);
	track("guarded", guarded);
	track("MAP_GROWSDOWN", gd);
	track("sparse", sparse);
	track("huge pages", thp);
	track("advised", advised);
	track("wipe-on-fork", wiped);

	/* heap and stack */
	size_t heap_len = 1 << 20;
	unsigned char *heap = malloc(heap_len);
	fill(heap, heap_len, 800);
	void *brk_before = sbrk(0);
	volatile unsigned char stack[64 * 1024];
	for (size_t i = 0; i < sizeof stack; i++)
		stack[i] = pattern(900, i);

	if (wl_read_file("/proc/self/maps", maps_before, sizeof maps_before) < 0)
		wl_die("read maps");
	if (wl_read_file("/proc/self/smaps", smaps_text, sizeof smaps_text) < 0)
		wl_die("read smaps");
	for (int i = 0; i < nregions; i++)
		if (vm_flags(regions[i].start, regions[i].flags_before, sizeof regions[i].flags_before))
			wl_die("find a region in smaps");
	wl_ready();
	wl_wait_sleeping();

	/* first, before anything can allocate */
	if (wl_read_file("/proc/self/maps", maps_after, sizeof maps_after) < 0)
		wl_fail("cannot read /proc/self/maps");
	compare_maps();
	if (wl_read_file("/proc/self/smaps", smaps_text, sizeof smaps_text) < 0)
		wl_fail("cannot read /proc/self/smaps");
	for (int i = 0; i < nregions; i++) {
		char now[128];
		if (vm_flags(regions[i].start, now, sizeof now))
			wl_fail("%s region at %p is gone from smaps", regions[i].name, regions[i].start);
		else if (strcmp(now, regions[i].flags_before))
			wl_fail("%s region: VmFlags '%s', were '%s'", regions[i].name, now, regions[i].flags_before);
	}

	for (unsigned long pg = 0; pg < 16; pg++) {
		char what[64];
		snprintf(what, sizeof what, "anon page %lu", pg);
		if (pg == 3 || pg == 9)
			expect_zero(what, anon + pg * PAGE, PAGE);
		else
			expect(what, anon + pg * PAGE, PAGE, 100 + pg);
	}
	for (unsigned long pg = 0; pg < 8; pg++) {
		char what[64];
		snprintf(what, sizeof what, "file mapping page %lu", pg);
		if (pg == 1 || pg == 5)
			expect(what, fmap + pg * PAGE, PAGE, 200 + pg);
		else if (memcmp(fmap + pg * PAGE, file_content + pg * PAGE, PAGE))
			wl_fail("%s differs from the file", what);
	}
	expect("read-only memory", ro, 4 * PAGE, 300);
	if (mprotect(none, 4 * PAGE, PROT_READ))
		wl_fail("mprotect PROT_NONE region: %s", strerror(errno));
	else
		expect("PROT_NONE memory", none, 4 * PAGE, 400);
	expect("guarded page 0", guarded, PAGE, 500);
	{
		static unsigned char whole[4 * PAGE];
		fill(whole, sizeof whole, 500);
		if (memcmp(guarded + 2 * PAGE, whole + 2 * PAGE, 2 * PAGE))
			wl_fail("guarded pages 2-3 differ");
	}
	if (have_guard && !(pagemap_entry(guarded + PAGE) >> 58 & 1))
		wl_fail("guard marker of page 1 is gone (pagemap %#llx)", (unsigned long long)pagemap_entry(guarded + PAGE));
	expect("MAP_GROWSDOWN memory", gd + PAGE, 3 * PAGE, 600);
	for (size_t off = 0; off < sparse_len; off += PAGE) {
		char what[64];
		snprintf(what, sizeof what, "sparse page %zu", off / PAGE);
		if (off % (64 * PAGE) == 0)
			expect(what, sparse + off, PAGE, 700 + off / PAGE);
		else
			expect_zero(what, sparse + off, PAGE);
		if (wl_failures_len)
			break;
	}
	expect("huge-page region", thp, thp_len, 1000);
	expect("advised region", advised, 8 * PAGE, 1100);
	expect("wipe-on-fork region", wiped, 4 * PAGE, 1200);
	/* The madvise bits must work, not just show: a child gets zeroes in the wipe-on-fork region
	 * and no mapping at all where the parent said MADV_DONTFORK. */
	pid_t child = fork();
	if (child == 0) {
		int bad = 0;
		for (size_t i = 0; i < 4 * PAGE; i++)
			if (wiped[i])
				bad |= 1;
		if (msync(advised, PAGE, MS_ASYNC) == 0 || errno != ENOMEM)
			bad |= 2;
		if (thp[12345] != pattern(1000, 12345))
			bad |= 4;
		_exit(bad);
	}
	int status = 0;
	if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status))
		wl_fail("a forked child did not exit normally (status %#x)", status);
	else if (WEXITSTATUS(status) & 1)
		wl_fail("a forked child sees the wipe-on-fork region's contents");
	else if (WEXITSTATUS(status) & 2)
		wl_fail("a forked child inherited the MADV_DONTFORK region");
	else if (WEXITSTATUS(status) & 4)
		wl_fail("a forked child sees other memory than its parent");
	expect("heap", heap, heap_len, 800);
	if (sbrk(0) != brk_before)
		wl_fail("program break moved: %p -> %p", brk_before, sbrk(0));
	for (size_t i = 0; i < sizeof stack; i++)
		if (stack[i] != pattern(900, i)) {
			wl_fail("stack byte %zu differs", i);
			break;
		}
	wl_finish();
}
