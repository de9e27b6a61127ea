/* Sets up pipes, eventfds and a signalfd with state, writes "ready", waits for SIGUSR2,
 * then checks that every object still holds that state and still works, and writes
 * PASS or FAIL: <why> into "result". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define PIPE_BYTES 3000
#define PIPE_SIZE (128 * 1024)
#define PIPE_READ_FD 40
#define PIPE_WRITE_FD 30

#define TIMER_MS 3000

static volatile sig_atomic_t go;
static struct timespec armed_at;

static long ms_since(const struct timespec *t) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - t->tv_sec) * 1000 + (now.tv_nsec - t->tv_nsec) / 1000000;
}
static char why[256];

static void on_usr2(int sig) { (void)sig; go = 1; }

static int fail(const char *what) {
    snprintf(why, sizeof why, "%s (errno %d)", what, errno);
    return 0;
}

static unsigned char pattern(int i) { return (unsigned char)(i * 7 + 3); }

static int check(int efd, int sem, int sfd, int empty_r, int empty_w, int tfd, int fired, int ep, int ify) {
    unsigned char buf[PIPE_BYTES + 16];
    struct epoll_event evs[8];
    int nev = epoll_wait(ep, evs, 8, 0);
    if (nev != 3) return fail("epoll: not 3 ready targets");
    unsigned seen = 0;
    for (int i = 0; i < nev; i++) {
        if (evs[i].data.u64 == 101 && evs[i].events == EPOLLIN) seen |= 1;
        if (evs[i].data.u64 == 102 && evs[i].events == EPOLLOUT) seen |= 2;
        if (evs[i].data.u64 == 103 && evs[i].events == EPOLLIN) seen |= 4;
    }
    if (seen != 7) return fail("epoll: wrong events or data");
    ssize_t n = read(PIPE_READ_FD, buf, sizeof buf);
    if (n != PIPE_BYTES) return fail("pipe: wrong number of unread bytes");
    for (int i = 0; i < PIPE_BYTES; i++)
        if (buf[i] != pattern(i)) return fail("pipe: data differs");
    if (read(PIPE_READ_FD, buf, 1) != -1 || errno != EAGAIN) return fail("pipe: read end not O_NONBLOCK or more data");
    if (fcntl(PIPE_WRITE_FD, F_GETPIPE_SZ) < PIPE_SIZE) return fail("pipe: capacity lost");
    if (fcntl(PIPE_READ_FD, F_GETFD) & FD_CLOEXEC) return fail("pipe: read end got FD_CLOEXEC");
    if (!(fcntl(PIPE_WRITE_FD, F_GETFD) & FD_CLOEXEC)) return fail("pipe: write end lost FD_CLOEXEC");
    if (write(PIPE_WRITE_FD, "xy", 2) != 2 || read(PIPE_READ_FD, buf, 2) != 2 || memcmp(buf, "xy", 2))
        return fail("pipe: ends not connected");
    if (write(empty_w, "z", 1) != 1 || read(empty_r, buf, 1) != 1 || buf[0] != 'z')
        return fail("empty pipe: ends not connected");

    uint64_t v = 0;
    if (!(fcntl(efd, F_GETFL) & O_NONBLOCK)) return fail("eventfd: lost O_NONBLOCK");
    if (read(efd, &v, 8) != 8 || v != 7) return fail("eventfd: count is not 7");
    if (read(efd, &v, 8) != -1 || errno != EAGAIN) return fail("eventfd: not empty after read");
    for (int i = 0; i < 3; i++)
        if (read(sem, &v, 8) != 8 || v != 1) return fail("eventfd: not a semaphore of 3");
    if (read(sem, &v, 8) != -1 || errno != EAGAIN) return fail("eventfd semaphore: more than 3");

    struct signalfd_siginfo si;
    if (read(sfd, &si, sizeof si) != -1 || errno != EAGAIN) return fail("signalfd: spurious signal");
    raise(SIGUSR1);
    if (read(sfd, &si, sizeof si) != sizeof si || si.ssi_signo != SIGUSR1) return fail("signalfd: SIGUSR1 not read");

    if (read(fired, &v, 8) != 8 || v != 1) return fail("timerfd: the unread expiration is lost");
    if (read(tfd, &v, 8) != -1 || errno != EAGAIN) return fail("timerfd: fired early");
    struct itimerspec left;
    if (timerfd_gettime(tfd, &left) || (left.it_value.tv_sec == 0 && left.it_value.tv_nsec == 0))
        return fail("timerfd: not armed");
    if (left.it_value.tv_sec >= TIMER_MS / 1000) return fail("timerfd: more time left than it was set to");
    struct pollfd pfd = {.fd = tfd, .events = POLLIN};
    if (poll(&pfd, 1, TIMER_MS + 1000) != 1) return fail("timerfd: did not fire in time");
    long waited = ms_since(&armed_at);
    if (waited < TIMER_MS - 20) return fail("timerfd: fired before its time");
    if (read(tfd, &v, 8) != 8 || v != 1) return fail("timerfd: no expiration to read");
    char ebuf[4096] __attribute__((aligned(8)));
    if (read(ify, ebuf, sizeof ebuf) != -1 || errno != EAGAIN) return fail("inotify: spurious event");
    int f = open("w2/new", O_CREAT | O_WRONLY, 0600);
    if (f < 0) return fail("inotify: create a file");
    close(f);
    n = read(ify, ebuf, sizeof ebuf);
    struct inotify_event *ie = (struct inotify_event *)ebuf;
    if (n < (ssize_t)sizeof *ie || ie->wd != 2 || !(ie->mask & IN_CREATE) || strcmp(ie->name, "new"))
        return fail("inotify: no IN_CREATE on wd 2");
    mkdir("w3", 0700);
    if (inotify_add_watch(ify, "w3", IN_CREATE) != 3) return fail("inotify: next wd is not 3");

    /* The eventfd is drained now: its target must no longer be ready; the others are. */
    nev = epoll_wait(ep, evs, 8, 0);
    for (int i = 0; i < nev; i++)
        if (evs[i].data.u64 == 101) return fail("epoll: drained eventfd still ready");
    return 1;
}

int main(void) {
    /* Whatever the test runner leaked to us is not part of the state under test. */
    for (int fd = 3; fd < 1024; fd++) close(fd);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);

    int p[2], e[2];
    if (pipe2(p, O_CLOEXEC) || pipe(e)) return 1;
    if (dup3(p[0], PIPE_READ_FD, 0) < 0 || dup3(p[1], PIPE_WRITE_FD, O_CLOEXEC) < 0) return 1;
    close(p[0]);
    close(p[1]);
    if (fcntl(PIPE_WRITE_FD, F_SETPIPE_SZ, PIPE_SIZE) < PIPE_SIZE) return 1;
    fcntl(PIPE_READ_FD, F_SETFL, O_NONBLOCK);
    unsigned char data[PIPE_BYTES];
    for (int i = 0; i < PIPE_BYTES; i++) data[i] = pattern(i);
    if (write(PIPE_WRITE_FD, data, PIPE_BYTES) != PIPE_BYTES) return 1;

    int efd = eventfd(7, EFD_NONBLOCK);
    int sem = eventfd(3, EFD_SEMAPHORE | EFD_NONBLOCK);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGUSR1);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK);
    if (efd < 0 || sem < 0 || sfd < 0) return 1;

    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    int fired = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec later = {.it_value = {.tv_sec = TIMER_MS / 1000}};
    struct itimerspec soon = {.it_value = {.tv_nsec = 1000000}};
    if (tfd < 0 || fired < 0) return 1;
    clock_gettime(CLOCK_MONOTONIC, &armed_at);
    if (timerfd_settime(tfd, 0, &later, NULL) || timerfd_settime(fired, 0, &soon, NULL)) return 1;
    usleep(20000);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 101};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev)) return 1;
    ev = (struct epoll_event){.events = EPOLLOUT, .data.u64 = 102};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, e[1], &ev)) return 1;
    ev = (struct epoll_event){.events = EPOLLIN, .data.u64 = 103};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, PIPE_READ_FD, &ev)) return 1;

    /* wd 1 is removed again: restore must skip it to give w2 its wd 2. */
    mkdir("w1", 0700);
    mkdir("w2", 0700);
    int ify = inotify_init1(IN_NONBLOCK);
    if (ify < 0 || inotify_add_watch(ify, "w1", IN_CREATE) != 1 || inotify_add_watch(ify, "w2", IN_CREATE) != 2)
        return 1;
    inotify_rm_watch(ify, 1);
    char drain[4096] __attribute__((aligned(8)));
    while (read(ify, drain, sizeof drain) > 0) {}

    FILE *ready = fopen("ready", "w");
    if (!ready) return 1;
    fputs("ready\n", ready);
    fclose(ready);

    while (!go) usleep(10000);

    int ok = check(efd, sem, sfd, e[0], e[1], tfd, fired, ep, ify);
    FILE *out = fopen("result", "w");
    if (!out) return 1;
    if (ok) fputs("PASS\n", out);
    else fprintf(out, "FAIL: %s\n", why);
    fclose(out);
    return 0;
}
