/* A process that keeps rewriting its memory while pre-copy rounds dump it, and knows what
 * every page must hold: page i of the main area holds pattern(i, gen[i]), gen[i] == 0 meaning
 * "zeroed by MADV_DONTNEED". With "churn", small mappings are also unmapped and mapped again
 * elsewhere all the time. On SIGUSR2 it checks every page and writes PASS or FAIL to `result`.
 *
 * usage: writer MIB PAGES_PER_TICK TICK_US [churn] [nozap] [gated]
 * (nozap: never MADV_DONTNEED, so every page of the area stays populated;
 *  gated: no timer, one tick per SIGUSR1, so that a test knows exactly what was written between
 *  two dumps however loaded the machine is. After each tick the file `ticks` holds the number of
 *  ticks done, then the index of every area page written by a gated tick so far, one per line;
 *  `ready` holds the area's address.)
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define SLOTS 8
#define SLOT_PAGES 16

static volatile sig_atomic_t check_requested;
static volatile sig_atomic_t ticks_requested;
static uint8_t *area;
static uint32_t *gen;
static size_t npages;
static uint8_t *slot_addr[SLOTS];
static uint32_t slot_gen[SLOTS];

static void fill(uint8_t *page, uint64_t id, uint32_t g) {
    uint64_t *w = (uint64_t *)page;
    uint64_t seed = id * 0x9E3779B97F4A7C15ULL ^ ((uint64_t)g << 32);
    for (size_t k = 0; k < PAGE / 8; k++)
        w[k] = g ? seed ^ (k * 0xBF58476D1CE4E5B9ULL) : 0;
}

static int page_ok(const uint8_t *page, uint64_t id, uint32_t g) {
    const uint64_t *w = (const uint64_t *)page;
    uint64_t seed = id * 0x9E3779B97F4A7C15ULL ^ ((uint64_t)g << 32);
    for (size_t k = 0; k < PAGE / 8; k++)
        if (w[k] != (g ? seed ^ (k * 0xBF58476D1CE4E5B9ULL) : 0))
            return 0;
    return 1;
}

static uint64_t rng = 88172645463325252ULL;
static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void on_usr2(int sig) {
    (void)sig;
    check_requested = 1;
}

static void on_usr1(int sig) {
    (void)sig;
    ticks_requested++;
}

static void write_file(const char *name, const char *text) {
    FILE *f = fopen(name, "w");
    if (!f)
        exit(3);
    fputs(text, f);
    fclose(f);
}

/* The written pages of the gated ticks, reported whole: written aside, then renamed, so that a
 * reader never sees half of it. */
static size_t *written_log;
static size_t written_len;

static void report_ticks(unsigned long done) {
    FILE *f = fopen("ticks.tmp", "w");
    if (!f)
        exit(3);
    fprintf(f, "%lu\n", done);
    for (size_t n = 0; n < written_len; n++)
        fprintf(f, "%zu\n", written_log[n]);
    fclose(f);
    if (rename("ticks.tmp", "ticks") != 0)
        exit(3);
}

static void churn(void) {
    int s = (int)(next_rand() % SLOTS);
    munmap(slot_addr[s], SLOT_PAGES * PAGE);
    /* A spare mapping first, so the new slot usually lands somewhere else. */
    void *spare = mmap(NULL, PAGE * (1 + next_rand() % 4), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *p = mmap(NULL, SLOT_PAGES * PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        exit(4);
    if (spare != MAP_FAILED && next_rand() % 2)
        munmap(spare, PAGE);
    slot_gen[s]++;
    for (int k = 0; k < SLOT_PAGES; k++)
        fill(p + k * PAGE, 1000000 + s * SLOT_PAGES + k, slot_gen[s]);
    slot_addr[s] = p;
}

static void check(void) {
    char msg[256];
    for (size_t i = 0; i < npages; i++) {
        if (!page_ok(area + i * PAGE, i, gen[i])) {
            snprintf(msg, sizeof msg, "FAIL page %zu gen %u\n", i, gen[i]);
            write_file("result", msg);
            exit(1);
        }
    }
    for (int s = 0; s < SLOTS; s++)
        for (int k = 0; k < SLOT_PAGES; k++)
            if (!page_ok(slot_addr[s] + k * PAGE, 1000000 + s * SLOT_PAGES + k, slot_gen[s])) {
                snprintf(msg, sizeof msg, "FAIL slot %d page %d\n", s, k);
                write_file("result", msg);
                exit(1);
            }
    write_file("result", "PASS\n");
    exit(0);
}

int main(int argc, char **argv) {
    if (argc < 4)
        return 2;
    /* Only stdio: a dump refuses what it cannot save, such as a pipe some shell leaked. */
    syscall(SYS_close_range, 3, ~0U, 0);
    size_t mib = strtoul(argv[1], NULL, 10);
    long per_tick = strtol(argv[2], NULL, 10);
    long tick_us = strtol(argv[3], NULL, 10);
    int do_churn = 0, zap = 1, gated = 0;
    for (int a = 4; a < argc; a++) {
        if (strcmp(argv[a], "churn") == 0)
            do_churn = 1;
        else if (strcmp(argv[a], "nozap") == 0)
            zap = 0;
        else if (strcmp(argv[a], "gated") == 0)
            gated = 1;
    }
    npages = mib * 256;
    area = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    gen = calloc(npages, sizeof *gen);
    if (area == MAP_FAILED || !gen)
        return 2;
    for (size_t i = 0; i < npages; i++) {
        gen[i] = 1;
        fill(area + i * PAGE, i, 1);
    }
    for (int s = 0; s < SLOTS; s++) {
        slot_addr[s] = mmap(NULL, SLOT_PAGES * PAGE, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        slot_gen[s] = 1;
        for (int k = 0; k < SLOT_PAGES; k++)
            fill(slot_addr[s] + k * PAGE, 1000000 + s * SLOT_PAGES + k, 1);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    char ready[64];
    snprintf(ready, sizeof ready, "ready %#lx\n", (unsigned long)area);
    write_file("ready", ready);
    for (unsigned long tick = 0;; tick++) {
        /* Polled rather than waited for in sigsuspend: a dump may stop the process anywhere,
         * and a sleep restarts cleanly after a restore. */
        while (gated && (unsigned long)ticks_requested <= tick) {
            if (check_requested)
                check();
            usleep(1000);
        }
        if (gated) {
            written_log = realloc(written_log, (written_len + (size_t)per_tick) * sizeof *written_log);
            if (!written_log)
                exit(2);
        }
        for (long n = 0; n < per_tick; n++) {
            if (check_requested)
                check();
            size_t i = next_rand() % npages;
            if (zap && next_rand() % 64 == 0) {
                madvise(area + i * PAGE, PAGE, MADV_DONTNEED);
                gen[i] = 0;
            } else {
                gen[i]++;
                fill(area + i * PAGE, i, gen[i]);
                if (gated)
                    written_log[written_len++] = i;
            }
        }
        if (do_churn && tick % 4 == 0)
            churn();
        if (check_requested)
            check();
        if (gated)
            report_ticks(tick + 1);
        else if (tick_us > 0)
            usleep((useconds_t)tick_us);
    }
}
