/* UDP and listening TCP sockets across a dump and restore.
 *
 * Holds:
 *   fd 10: UDP bound to 127.0.0.1 (kernel-chosen port), SO_REUSEADDR, SO_BROADCAST,
 *          SO_RCVBUF 100000, IP_TOS 0x10, SO_PRIORITY 5, SO_RCVLOWAT 3,
 *          SO_RCVTIMEO 2.5 s, and a datagram queued in it
 *          (dropped by the dump, as CRIU does);
 *   fd 11: UDP connected to fd 10's address;
 *   fd 12: UDP on [::1], IPV6_V6ONLY (where the host has IPv6);
 *   fd 13: TCP listening on 127.0.0.1 with backlog 5, SO_REUSEADDR, TCP_NODELAY,
 *          O_NONBLOCK;
 *   fd 14: a TCP socket never bound nor connected.
 * The ready file holds "UDP_PORT TCP_PORT v6" ("nov6" without the IPv6 socket). After SIGUSR2 it checks names and options, then
 * serves: a datagram on fd 10 is answered from fd 10 ("pong:" + what came), a connection on
 * fd 13 is accepted, sent "world" after it says "hello", and closed. It finishes once both
 * were served (or after 10 s). */
#include "workload.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

static void move_to(int fd, int target)
{
	if (fd < 0)
		wl_die("socket");
	if (fd != target) {
		if (dup2(fd, target) != target)
			wl_die("dup2");
		close(fd);
	}
}

static int opt(int fd, int level, int name)
{
	int v = -1;
	socklen_t len = sizeof v;
	if (getsockopt(fd, level, name, &v, &len))
		return -1;
	return v;
}

static void set(int fd, int level, int name, int v)
{
	if (setsockopt(fd, level, name, &v, sizeof v))
		wl_die("setsockopt");
}

static int port_of(int fd)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof ss;
	if (getsockname(fd, (struct sockaddr *)&ss, &len))
		return -1;
	if (ss.ss_family == AF_INET6)
		return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
	return ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	struct sockaddr_in lo;
	memset(&lo, 0, sizeof lo);
	lo.sin_family = AF_INET;
	lo.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

	move_to(socket(AF_INET, SOCK_DGRAM, 0), 10);
	set(10, SOL_SOCKET, SO_REUSEADDR, 1);
	set(10, SOL_SOCKET, SO_BROADCAST, 1);
	set(10, SOL_SOCKET, SO_RCVBUF, 100000);
	set(10, IPPROTO_IP, IP_TOS, 0x10);
	set(10, SOL_SOCKET, SO_PRIORITY, 5);
	set(10, SOL_SOCKET, SO_RCVLOWAT, 3);
	struct timeval tmo = { 2, 500000 };
	if (setsockopt(10, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof tmo))
		wl_die("SO_RCVTIMEO");
	if (bind(10, (struct sockaddr *)&lo, sizeof lo))
		wl_die("bind udp");
	int rcvbuf = opt(10, SOL_SOCKET, SO_RCVBUF);
	struct sockaddr_in udp_addr = lo;
	udp_addr.sin_port = htons((uint16_t)port_of(10));

	move_to(socket(AF_INET, SOCK_DGRAM, 0), 11);
	if (connect(11, (struct sockaddr *)&udp_addr, sizeof udp_addr))
		wl_die("connect udp");
	int client_port = port_of(11);
	if (send(11, "stale", 5, 0) != 5)
		wl_die("send stale datagram");

	/* A host without IPv6 (or without ::1) skips that socket and says so. */
	int has_v6 = 0, v6_port = -1;
	int s6 = socket(AF_INET6, SOCK_DGRAM, 0);
	if (s6 >= 0) {
		move_to(s6, 12);
		set(12, IPPROTO_IPV6, IPV6_V6ONLY, 1);
		struct sockaddr_in6 lo6;
		memset(&lo6, 0, sizeof lo6);
		lo6.sin6_family = AF_INET6;
		lo6.sin6_addr = in6addr_loopback;
		if (bind(12, (struct sockaddr *)&lo6, sizeof lo6) == 0) {
			has_v6 = 1;
			v6_port = port_of(12);
		} else {
			close(12);
		}
	}

	move_to(socket(AF_INET, SOCK_STREAM, 0), 13);
	set(13, SOL_SOCKET, SO_REUSEADDR, 1);
	set(13, IPPROTO_TCP, TCP_NODELAY, 1);
	if (bind(13, (struct sockaddr *)&lo, sizeof lo) || listen(13, 5))
		wl_die("listen");
	fcntl(13, F_SETFL, O_NONBLOCK);

	move_to(socket(AF_INET, SOCK_STREAM, 0), 14);

	char ready[64];
	snprintf(ready, sizeof ready, "%d %d %s\n", port_of(10), port_of(13), has_v6 ? "v6" : "nov6");
	int udp_port = port_of(10), tcp_port = port_of(13);
	wl_ready_with(ready);
	wl_wait_sleeping();

	if (port_of(10) != udp_port || port_of(11) != client_port || port_of(12) != v6_port ||
	    port_of(13) != tcp_port)
		wl_fail("ports changed: %d %d %d %d", port_of(10), port_of(11), port_of(12), port_of(13));
	if (opt(10, SOL_SOCKET, SO_REUSEADDR) != 1 || opt(10, SOL_SOCKET, SO_BROADCAST) != 1)
		wl_fail("udp SO_REUSEADDR/SO_BROADCAST lost");
	if (opt(10, SOL_SOCKET, SO_RCVBUF) != rcvbuf)
		wl_fail("udp SO_RCVBUF %d, expected %d", opt(10, SOL_SOCKET, SO_RCVBUF), rcvbuf);
	if (opt(10, SOL_SOCKET, SO_PRIORITY) != 5 || opt(10, SOL_SOCKET, SO_RCVLOWAT) != 3)
		wl_fail("udp SO_PRIORITY %d / SO_RCVLOWAT %d", opt(10, SOL_SOCKET, SO_PRIORITY),
			opt(10, SOL_SOCKET, SO_RCVLOWAT));
	if (opt(10, IPPROTO_IP, IP_TOS) != 0x10)
		wl_fail("udp IP_TOS %#x", opt(10, IPPROTO_IP, IP_TOS));
	struct timeval got_tmo;
	socklen_t tlen = sizeof got_tmo;
	if (getsockopt(10, SOL_SOCKET, SO_RCVTIMEO, &got_tmo, &tlen) || got_tmo.tv_sec != 2 ||
	    got_tmo.tv_usec / 1000 != 500)
		wl_fail("udp SO_RCVTIMEO lost");
	struct sockaddr_in peer;
	socklen_t plen = sizeof peer;
	if (getpeername(11, (struct sockaddr *)&peer, &plen) || peer.sin_port != udp_addr.sin_port ||
	    peer.sin_addr.s_addr != udp_addr.sin_addr.s_addr)
		wl_fail("connected udp lost its peer");
	if (has_v6 && opt(12, IPPROTO_IPV6, IPV6_V6ONLY) != 1)
		wl_fail("udp6 lost IPV6_V6ONLY");
	if (opt(13, SOL_SOCKET, SO_ACCEPTCONN) != 1 || opt(13, IPPROTO_TCP, TCP_NODELAY) != 1 ||
	    opt(13, SOL_SOCKET, SO_REUSEADDR) != 1)
		wl_fail("tcp listener lost listen/TCP_NODELAY/SO_REUSEADDR");
	if (!(fcntl(13, F_GETFL) & O_NONBLOCK) || (fcntl(10, F_GETFL) & O_NONBLOCK))
		wl_fail("O_NONBLOCK not as it was");
	if (opt(14, SOL_SOCKET, SO_TYPE) != SOCK_STREAM || port_of(14) != 0)
		wl_fail("unbound tcp socket changed");
	/* The datagram queued at dump time is gone; one sent now arrives. */
	if (send(11, "fresh", 5, MSG_DONTWAIT) != 5)
		wl_fail("connected udp cannot send (errno %d)", errno);

	int served_udp = 0, served_tcp = 0;
	double until = wl_now() + 10;
	while ((!served_udp || !served_tcp) && wl_now() < until) {
		struct pollfd pfd[2] = { { 10, POLLIN, 0 }, { 13, POLLIN, 0 } };
		if (poll(pfd, 2, 200) <= 0)
			continue;
		if (pfd[0].revents & POLLIN) {
			char buf[64], reply[80];
			struct sockaddr_in from;
			socklen_t flen = sizeof from;
			ssize_t n = recvfrom(10, buf, sizeof buf - 1, 0, (struct sockaddr *)&from, &flen);
			if (n > 0) {
				buf[n] = 0;
				if (!strcmp(buf, "fresh"))
					continue;
				if (!strcmp(buf, "stale"))
					wl_fail("the datagram queued at dump time was restored");
				int len = snprintf(reply, sizeof reply, "pong:%s", buf);
				sendto(10, reply, (size_t)len, 0, (struct sockaddr *)&from, flen);
				served_udp = 1;
			}
		}
		if (pfd[1].revents & POLLIN) {
			int c = accept(13, NULL, NULL);
			char buf[16] = { 0 };
			if (c >= 0 && read(c, buf, 5) == 5 && !memcmp(buf, "hello", 5) &&
			    write(c, "world", 5) == 5)
				served_tcp = 1;
			if (c >= 0)
				close(c);
		}
	}
	if (!served_udp || !served_tcp)
		wl_fail("served udp %d tcp %d", served_udp, served_tcp);
	wl_finish();
}
