/* A UDP request/response server: answers each request (a 64-bit id) with the id and a checksum
 * of a table it keeps, so a client can tell a right answer from a stale one. It waits at most
 * 1 ms per iteration, so its stamps show when it could not run.
 * Usage: udp_server STAMPS PORT */
#include "mig.h"

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#define ENTRIES 16384
static uint64_t table[ENTRIES];

static uint64_t entry(uint64_t i)
{
	return i * 0xff51afd7ed558ccdULL ^ 0x1234;
}

static int verify(char *msg, size_t len)
{
	for (uint64_t i = 0; i < ENTRIES; i++)
		if (table[i] != entry(i)) {
			snprintf(msg, len, "table entry %llu differs", (unsigned long long)i);
			return 1;
		}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	mig_init(argv[1], 5000000, verify);
	for (uint64_t i = 0; i < ENTRIES; i++)
		table[i] = entry(i);
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr))
		mig_die("bind");
	mig_ready();
	for (;;) {
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		if (poll(&pfd, 1, 1) > 0) {
			uint64_t req[2], rep[2];
			struct sockaddr_in peer;
			socklen_t plen = sizeof peer;
			ssize_t n = recvfrom(fd, req, sizeof req, MSG_DONTWAIT, (struct sockaddr *)&peer, &plen);
			if (n >= 8) {
				rep[0] = req[0];
				rep[1] = table[req[0] % ENTRIES];
				sendto(fd, rep, sizeof rep, 0, (struct sockaddr *)&peer, plen);
			}
		}
		mig_tick();
	}
}
