/* The workload of the prepared post-copy test: counts once a millisecond, the count
 * in a register the loop keeps across its calls and stored in a private anonymous page
 * (lazy in a lazy dump). A restored copy that took the registers of an earlier dump
 * would report an earlier count than the memory of a later one holds.
 *
 * Every 8 counts it appends a byte to DIR/log through an fd it keeps open (the file
 * position moves between dumps).
 *
 * prepared_counter DIR [THREADS]: starts THREADS more threads that sleep in a loop (held
 * and switched too), writes DIR/ready ("pid address-of-the-count"); on DIR/grow maps
 * and touches a new region (the memory layout changes) and writes DIR/grown; on
 * DIR/report writes 1 to DIR/affinity if every thread's CPU affinity is still the one it
 * started with (0 if not), then its count and its log's position to DIR/count, and exits
 * 0. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static int exists(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

static void put(const char *dir, const char *name, unsigned long a, unsigned long b, int two) {
    char path[4096], tmp[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s/.%s", dir, name);
    FILE *f = fopen(tmp, "w");
    if (!f)
        exit(2);
    if (two)
        fprintf(f, "%lu %lu\n", a, b);
    else
        fprintf(f, "%lu\n", a);
    fclose(f);
    rename(tmp, path);
}

static int running;
#define MAX_THREADS 64
static pid_t tids[MAX_THREADS + 1];

static void *sleeper(void *arg) {
    tids[(long)arg] = (pid_t)syscall(SYS_gettid);
    __atomic_add_fetch(&running, 1, __ATOMIC_SEQ_CST);
    for (;;)
        usleep(700);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    const char *dir = argv[1];
    for (int fd = 3; fd < 1024; fd++)
        close(fd);
    char logpath[4096];
    snprintf(logpath, sizeof logpath, "%s/log", dir);
    int logfd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (logfd < 0)
        return 2;
    volatile unsigned long *mem =
        mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return 2;
    *mem = 0;
    int threads = argc > 2 ? atoi(argv[2]) : 0;
    if (threads > MAX_THREADS)
        return 2;
    cpu_set_t initial;
    if (sched_getaffinity(0, sizeof initial, &initial) != 0)
        return 2;
    tids[0] = (pid_t)syscall(SYS_gettid);
    for (long i = 0; i < threads; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, sleeper, (void *)(i + 1)) != 0)
            return 2;
    }
    /* Started for good (robust list, rseq) before the first dump. */
    while (__atomic_load_n(&running, __ATOMIC_SEQ_CST) < threads)
        usleep(100);
    put(dir, "ready", (unsigned long)getpid(), (unsigned long)mem, 1);
    unsigned long count = 0;
    int grown = 0;
    for (;;) {
        count++;
        *mem = count;
        if (count % 8 == 0 && write(logfd, "x", 1) != 1)
            return 2;
        if (!grown && exists(dir, "grow")) {
            volatile char *more =
                mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (more == MAP_FAILED)
                return 2;
            more[0] = 1;
            grown = 1;
            put(dir, "grown", 1, 0, 0);
        }
        if (exists(dir, "report")) {
            int same = 1;
            for (int i = 0; i <= threads; i++) {
                cpu_set_t now;
                if (sched_getaffinity(tids[i], sizeof now, &now) != 0 || !CPU_EQUAL(&now, &initial))
                    same = 0;
            }
            put(dir, "affinity", (unsigned long)same, 0, 0);
            put(dir, "count", count, (unsigned long)lseek(logfd, 0, SEEK_CUR), 1);
            return 0;
        }
        usleep(1000);
    }
}
