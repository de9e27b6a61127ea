/* Clients with deadlines: three request streams, whose deadlines are 10, 30 and 50 ms, each with
 * one request outstanding at a time. A request not answered (correctly) within its deadline counts
 * as timed out, and the stream moves on to the next one. Counters are kept in a shared file the
 * harness reads while the clients run:
 *   u64 sent[3], answered[3], timed_out[3], wrong[3]   (class order 10, 30, 50 ms)
 * Usage: udp_client STATS IP PORT */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CLASSES 3
static const uint64_t deadline_ms[CLASSES] = {10, 30, 50};

struct stats {
	uint64_t sent[CLASSES], answered[CLASSES], timed_out[CLASSES], wrong[CLASSES];
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t expected(uint64_t id)
{
	return (id % 16384) * 0xff51afd7ed558ccdULL ^ 0x1234;
}

int main(int argc, char **argv)
{
	if (argc < 4)
		return 2;
	int sfd = open(argv[1], O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (sfd < 0 || ftruncate(sfd, sizeof(struct stats)))
		return 2;
	struct stats *st = mmap(NULL, sizeof *st, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
	if (st == MAP_FAILED)
		return 2;
	struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[3]))};
	if (inet_pton(AF_INET, argv[2], &server.sin_addr) != 1)
		return 2;
	int fd[CLASSES];
	uint64_t id[CLASSES], sent_at[CLASSES];
	for (int c = 0; c < CLASSES; c++) {
		fd[c] = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd[c] < 0)
			return 2;
		id[c] = (uint64_t)c << 48;
		sent_at[c] = 0;
	}
	for (;;) {
		uint64_t now = now_ns();
		for (int c = 0; c < CLASSES; c++) {
			if (sent_at[c] && now - sent_at[c] > deadline_ms[c] * 1000000ULL) {
				st->timed_out[c]++;
				sent_at[c] = 0;
			}
			if (!sent_at[c]) {
				id[c]++;
				sendto(fd[c], &id[c], sizeof id[c], 0, (struct sockaddr *)&server, sizeof server);
				st->sent[c]++;
				sent_at[c] = now_ns();
			}
		}
		struct pollfd pfd[CLASSES];
		for (int c = 0; c < CLASSES; c++)
			pfd[c] = (struct pollfd){.fd = fd[c], .events = POLLIN};
		if (poll(pfd, CLASSES, 1) <= 0)
			continue;
		for (int c = 0; c < CLASSES; c++) {
			uint64_t rep[2];
			while (recv(fd[c], rep, sizeof rep, 0) == sizeof rep) {
				/* A late answer to an earlier request is not an answer to this one. */
				if (!sent_at[c] || rep[0] != id[c])
					continue;
				if (rep[1] == expected(rep[0]))
					st->answered[c]++;
				else
					st->wrong[c]++;
				sent_at[c] = 0;
			}
		}
	}
}
