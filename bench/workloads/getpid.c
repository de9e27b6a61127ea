/* The thesis's light-weight process: calls getpid() forever. Its only data is a small table
 * it checks after migration (and, through mig.h, that its pid survived).
 * Usage: getpid STAMPS */
#include "mig.h"

#include <sys/syscall.h>

#define WORDS 2048
static uint64_t table[WORDS];

static int verify(char *msg, size_t len)
{
	for (uint64_t i = 0; i < WORDS; i++)
		if (table[i] != i * 0x9e3779b97f4a7c15ULL) {
			snprintf(msg, len, "table word %llu differs", (unsigned long long)i);
			return 1;
		}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	mig_init(argv[1], 50000, verify);
	for (uint64_t i = 0; i < WORDS; i++)
		table[i] = i * 0x9e3779b97f4a7c15ULL;
	mig_ready();
	for (;;) {
		syscall(SYS_getpid);
		mig_tick();
	}
}
