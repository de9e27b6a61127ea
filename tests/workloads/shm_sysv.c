/* SysV shared memory: a segment with a key of its own, mode 0640 and an unaligned size,
 * attached twice (read-write, and read-only at another address; one page of the read-write
 * attach made read-only by mprotect, which splits it in three VMAs), and a private segment
 * removed (IPC_RMID) while attached. The ready file says "id=ID key=KEY" so that a test can
 * remove the first segment before the restore. After restore: the contents are back
 * (checksummed), both attaches show one segment, IPC_STAT gives the same id, key, size and
 * mode as before, and the removed segment is still usable but still marked removed (it goes
 * with its last attach). The first segment is removed at the end. */
#include "workload.h"

#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>

#define SIZE (5 * 4096 + 300)

static unsigned char pattern(size_t i)
{
	return (unsigned char)(i * 31 + 11);
}

/* The permissions /proc/self/maps shows for the VMA starting at ADDR ("" if none). */
static const char *perms_at(void *addr)
{
	static char buf[65536], perms[8];
	perms[0] = 0;
	if (wl_read_file("/proc/self/maps", buf, sizeof buf) < 0)
		return perms;
	for (char *line = buf; line && *line;) {
		unsigned long start;
		if (sscanf(line, "%lx-%*x %7s", &start, perms) == 2 && start == (unsigned long)addr)
			return perms;
		perms[0] = 0;
		char *nl = strchr(line, '\n');
		line = nl ? nl + 1 : NULL;
	}
	return perms;
}

static uint64_t checksum(const unsigned char *p, size_t n)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 1099511628211ULL;
	return h;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	key_t key = (key_t)(0x5c000000 | (getpid() & 0xffffff));
	int id = shmget(key, SIZE, IPC_CREAT | IPC_EXCL | 0640);
	if (id < 0)
		wl_die("shmget");
	unsigned char *rw = shmat(id, NULL, 0);
	unsigned char *ro = shmat(id, NULL, SHM_RDONLY);
	if (rw == (void *)-1 || ro == (void *)-1) {
		shmctl(id, IPC_RMID, NULL);
		wl_die("shmat");
	}
	for (size_t i = 0; i < SIZE; i++)
		rw[i] = pattern(i);
	uint64_t sum = checksum(rw, SIZE);
	int gone = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
	unsigned char *orphan = gone < 0 ? (void *)-1 : shmat(gone, NULL, 0);
	if (orphan == (void *)-1) {
		shmctl(id, IPC_RMID, NULL);
		wl_die("the second segment");
	}
	memset(orphan, 0x5a, 4096);
	if (mprotect(rw + 4096, 4096, PROT_READ))
		wl_die("mprotect part of the attach");
	shmctl(gone, IPC_RMID, NULL);
	struct shmid_ds before;
	if (shmctl(id, IPC_STAT, &before))
		wl_die("IPC_STAT");
	char ready[128];
	snprintf(ready, sizeof ready, "id=%d key=%d\n", id, (int)key);
	wl_ready_with(ready);
	wl_wait_sleeping();

	if (checksum(rw, SIZE) != sum)
		wl_fail("the contents differ");
	if (checksum(ro, SIZE) != sum)
		wl_fail("the contents seen through the read-only attach differ");
	char p0[8], p1[8], p2[8];
	snprintf(p0, sizeof p0, "%s", perms_at(rw));
	snprintf(p1, sizeof p1, "%s", perms_at(rw + 4096));
	snprintf(p2, sizeof p2, "%s", perms_at(rw + 8192));
	if (strcmp(p0, "rw-s") || strcmp(p1, "r--s") || strcmp(p2, "rw-s"))
		wl_fail("the split attach is %s %s %s, expected rw-s r--s rw-s", p0, p1, p2);
	rw[100] ^= 0xff;
	if (ro[100] != rw[100])
		wl_fail("the two attaches are not one segment");
	struct shmid_ds ds;
	if (shmctl(id, IPC_STAT, &ds))
		wl_fail("IPC_STAT of segment %d: %s", id, strerror(errno));
	else {
		if (ds.shm_perm.__key != key)
			wl_fail("key is %#x, expected %#x", ds.shm_perm.__key, key);
		if (ds.shm_segsz != SIZE)
			wl_fail("size is %zu, expected %d", (size_t)ds.shm_segsz, SIZE);
		if ((ds.shm_perm.mode & 0777) != 0640)
			wl_fail("mode is %o", ds.shm_perm.mode & 0777);
		/* The kernel counts each VMA of an attach (mprotect split one in three). */
		if (ds.shm_nattch != before.shm_nattch)
			wl_fail("%lu attaches, %lu before", (unsigned long)ds.shm_nattch,
				(unsigned long)before.shm_nattch);
	}
	struct shmid_ds gds;
	if (orphan[0] != 0x5a || orphan[4095] != 0x5a)
		wl_fail("the segment removed while attached lost its contents");
	if (shmctl(gone, IPC_STAT, &gds))
		wl_fail("IPC_STAT of the removed segment %d: %s", gone, strerror(errno));
	else if (!(gds.shm_perm.mode & SHM_DEST))
		wl_fail("the removed segment is no longer marked removed (mode %o)", gds.shm_perm.mode);
	if (shmget(key, 0, 0) != id)
		wl_fail("the key finds segment %d, expected %d", shmget(key, 0, 0), id);
	shmctl(id, IPC_RMID, NULL);
	wl_finish();
}
