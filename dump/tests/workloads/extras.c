/* State CRIU's format has no field for, which ckpt keeps in its extensions: each of two
 * threads sets its own CPU affinity (one CPU each, different ones where there are two),
 * timer slack and I/O priority, and the process sets memory-deny-write-execute. Once set up
 * it writes `ready`; on SIGUSR2 (sent after a restore) each thread checks its own values,
 * the main thread also checks MDWE (asking for it and trying to make a page executable),
 * then writes PASS or FAIL with what differed to `result` and exits 0 or 1.
 *
 * usage: extras
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_MDWE
#define PR_SET_MDWE 65
#define PR_GET_MDWE 66
#endif
#define MDWE_REFUSE_EXEC_GAIN 1UL
#define IOPRIO_WHO_PROCESS 1
#define IOPRIO_CLASS_BE 2
#define IOPRIO_CLASS_IDLE 3
#define IOPRIO(class, level) (((class) << 13) | (level))

struct want {
    int cpu;
    unsigned long slack;
    int ioprio;
};

static struct want want_main, want_thread;
static volatile sig_atomic_t check_requested;
static int thread_set_up, thread_checked, thread_may_check;
static char thread_verdict[512];

static void on_usr2(int sig) {
    (void)sig;
    check_requested = 1;
}

static void nap(void) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

static int set_up(const struct want *w) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w->cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0)
        return -1;
    if (prctl(PR_SET_TIMERSLACK, w->slack, 0, 0, 0) != 0)
        return -1;
    if (syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, w->ioprio) != 0)
        return -1;
    return 0;
}

/* Appends to `out` what differs from `w` in the calling thread. */
static void check(const char *who, const struct want *w, char *out, size_t len) {
    cpu_set_t set;
    CPU_ZERO(&set);
    size_t used = strlen(out);
    if (sched_getaffinity(0, sizeof(set), &set) != 0)
        used += snprintf(out + used, len - used, "%s: sched_getaffinity: %s; ", who, strerror(errno));
    else if (CPU_COUNT(&set) != 1 || !CPU_ISSET(w->cpu, &set))
        used += snprintf(out + used, len - used, "%s: affinity has %d cpus, want only cpu %d; ", who,
                         CPU_COUNT(&set), w->cpu);
    long slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    if (used < len && slack != (long)w->slack)
        used += snprintf(out + used, len - used, "%s: timer slack %ld, want %lu; ", who, slack, w->slack);
    long prio = syscall(SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0);
    if (used < len && prio != w->ioprio)
        snprintf(out + used, len - used, "%s: ioprio %#lx, want %#x; ", who, prio, w->ioprio);
}

static void *thread_main(void *arg) {
    (void)arg;
    if (set_up(&want_thread) != 0) {
        perror("thread set up");
        exit(2);
    }
    __atomic_store_n(&thread_set_up, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&thread_may_check, __ATOMIC_ACQUIRE))
        nap();
    check("thread", &want_thread, thread_verdict, sizeof(thread_verdict));
    __atomic_store_n(&thread_checked, 1, __ATOMIC_RELEASE);
    for (;;)
        pause();
    return NULL;
}

static void write_file(const char *name, const char *text) {
    char tmp[64];
    snprintf(tmp, sizeof(tmp), "%s.tmp", name);
    FILE *f = fopen(tmp, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0 || rename(tmp, name) != 0) {
        perror(name);
        exit(2);
    }
}

int main(void) {
    /* Only stdio: a dump refuses fds it cannot save (pipes), and ours may inherit some. */
    syscall(SYS_close_range, 3, ~0U, 0);
    cpu_set_t all;
    CPU_ZERO(&all);
    if (sched_getaffinity(0, sizeof(all), &all) != 0) {
        perror("sched_getaffinity");
        return 2;
    }
    int lo = -1, hi = -1;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (CPU_ISSET(c, &all)) {
            if (lo < 0)
                lo = c;
            hi = c;
        }
    }
    want_main = (struct want){hi, 123456, IOPRIO(IOPRIO_CLASS_BE, 3)};
    want_thread = (struct want){lo, 654321, IOPRIO(IOPRIO_CLASS_IDLE, 0)};

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);

    if (set_up(&want_main) != 0) {
        perror("main set up");
        return 2;
    }
    pthread_t thread;
    if (pthread_create(&thread, NULL, thread_main, NULL) != 0)
        return 2;
    while (!__atomic_load_n(&thread_set_up, __ATOMIC_ACQUIRE))
        nap();
    if (prctl(PR_SET_MDWE, MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0) {
        perror("PR_SET_MDWE");
        return 3;
    }
    char ready[64];
    snprintf(ready, sizeof(ready), "%d %d\n", hi, lo);
    write_file("ready", ready);

    while (!check_requested)
        nap();

    char verdict[1024] = "";
    check("main", &want_main, verdict, sizeof(verdict));
    long mdwe = prctl(PR_GET_MDWE, 0, 0, 0, 0);
    size_t used = strlen(verdict);
    if (mdwe != (long)MDWE_REFUSE_EXEC_GAIN)
        used += snprintf(verdict + used, sizeof(verdict) - used, "mdwe %ld, want 1; ", mdwe);
    void *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        used += snprintf(verdict + used, sizeof(verdict) - used, "mmap: %s; ", strerror(errno));
    else if (mprotect(page, 4096, PROT_READ | PROT_EXEC) == 0)
        used += snprintf(verdict + used, sizeof(verdict) - used,
                         "a writable page became executable despite MDWE; ");

    __atomic_store_n(&thread_may_check, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < 1000 && !__atomic_load_n(&thread_checked, __ATOMIC_ACQUIRE); i++)
        nap();
    if (!__atomic_load_n(&thread_checked, __ATOMIC_ACQUIRE))
        snprintf(verdict + used, sizeof(verdict) - used, "the thread never checked; ");
    else
        snprintf(verdict + used, sizeof(verdict) - used, "%s", thread_verdict);

    if (verdict[0] == '\0') {
        write_file("result", "PASS\n");
        return 0;
    }
    char out[1100];
    snprintf(out, sizeof(out), "FAIL: %s\n", verdict);
    write_file("result", out);
    return 1;
}
