/* Keeps creating and joining short-lived threads, next to N idle ones, so that a dump always
 * races with thread creation. Writes "ready" to argv[2] once the idle threads exist. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static void *quick(void *arg) { return arg; }
static void *idle(void *arg) { for (;;) pause(); return arg; }

int main(int argc, char **argv)
{
	if (argc < 3) return 2;
	syscall(SYS_close_range, 3, ~0U, 0);
	int n = atoi(argv[1]);
	for (int i = 0; i < n; i++) {
		pthread_t t;
		pthread_create(&t, NULL, idle, NULL);
	}
	FILE *f = fopen(argv[2], "w");
	if (!f) return 2;
	fputs("ready\n", f);
	fclose(f);
	for (;;) {
		pthread_t t;
		pthread_create(&t, NULL, quick, NULL);
		pthread_join(t, NULL);
	}
}
