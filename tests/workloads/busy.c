/* A transition workload: caught while it works, not while it waits.
 *   - a writer thread fills a 16 MiB ring with a running sequence number, never pausing;
 *   - a mapper thread keeps mapping, filling, checking and unmapping small regions.
 * After the restore both carry on; on SIGUSR2 they are stopped and the ring must hold exactly
 * the last RING values in order, and the mapper must never have seen a wrong byte. */
#include "workload.h"

#include <pthread.h>
#include <sys/mman.h>

#define RING (16UL << 20 >> 3)

static uint64_t *ring;
static volatile uint64_t written; /* sequence numbers 0..written-1 have been stored */
static volatile int stop;
static volatile int mapper_broken;
static volatile unsigned long mapper_rounds;

static void *writer(void *arg)
{
	(void)arg;
	uint64_t seq = 0;
	while (!stop) {
		ring[seq % RING] = seq;
		seq++;
		written = seq;
	}
	return NULL;
}

static void *mapper(void *arg)
{
	(void)arg;
	for (unsigned long round = 0; !stop; round++) {
		size_t len = (1 + round % 16) * 4096;
		unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			mapper_broken = 1;
			break;
		}
		memset(p, (int)(round & 0xff), len);
		for (size_t i = 0; i < len; i += 512)
			if (p[i] != (unsigned char)(round & 0xff))
				mapper_broken = 2;
		munmap(p, len);
		mapper_rounds = round;
		if (round % 64 == 0)
			sched_yield();
	}
	return NULL;
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	ring = mmap(NULL, RING * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ring == MAP_FAILED)
		wl_die("mmap ring");
	pthread_t w, m;
	if (pthread_create(&w, NULL, writer, NULL) || pthread_create(&m, NULL, mapper, NULL))
		wl_die("pthread_create");
	/* the ring has wrapped at least once: every slot holds a value */
	while (written < 2 * RING)
		sched_yield();
	wl_ready();
	wl_wait_sleeping();

	uint64_t before = written;
	unsigned long rounds_before = mapper_rounds;
	struct timespec ts = { 0, 100 * 1000 * 1000 };
	nanosleep(&ts, NULL);
	if (written == before)
		wl_fail("the writer thread does not run");
	if (mapper_rounds == rounds_before)
		wl_fail("the mapper thread does not run");
	stop = 1;
	pthread_join(w, NULL);
	pthread_join(m, NULL);
	uint64_t end = written;
	for (uint64_t seq = end - RING; seq < end; seq++)
		if (ring[seq % RING] != seq) {
			wl_fail("ring slot %llu holds %llu, expected %llu", (unsigned long long)(seq % RING),
				(unsigned long long)ring[seq % RING], (unsigned long long)seq);
			break;
		}
	if (mapper_broken)
		wl_fail("the mapper saw a failure (%d)", mapper_broken);
	wl_finish();
}
