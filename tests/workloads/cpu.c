/* FPU, SSE, AVX and AVX-512 state: known values are loaded into zmm0-31 (ymm0-15 without
 * AVX-512), k0-7, x87 st0/st1 with a non-default control word, MXCSR, and the callee-saved general
 * registers, then the thread spins in assembly, touching none of them, until SIGUSR2. The values
 * read back afterwards must be the ones loaded. */
#include "workload.h"

#include <cpuid.h>
#include <pthread.h>

#include "cpu_asm.inc"

struct misc {
	uint16_t cw_in;
	uint16_t pad0;
	uint32_t mxcsr_in;
	uint8_t pad1[8];
	long double a_in;   /* 16 */
	long double b_in;   /* 32 */
	uint8_t pad2[16];
	uint64_t gpr_out[5]; /* 64 */
	uint8_t pad3[8];
	long double st0_out; /* 112 */
	long double st1_out; /* 128 */
	uint16_t cw_out;     /* 144 */
	uint16_t pad4;
	uint32_t mxcsr_out; /* 148 */
} __attribute__((aligned(64)));

_Static_assert(__builtin_offsetof(struct misc, a_in) == 16, "layout used by cpu_asm.inc");
_Static_assert(__builtin_offsetof(struct misc, gpr_out) == 64, "layout used by cpu_asm.inc");
_Static_assert(__builtin_offsetof(struct misc, st0_out) == 112, "layout used by cpu_asm.inc");
_Static_assert(__builtin_offsetof(struct misc, cw_out) == 144, "layout used by cpu_asm.inc");
_Static_assert(__builtin_offsetof(struct misc, mxcsr_out) == 148, "layout used by cpu_asm.inc");

struct hold_flags {
	volatile int stop;   /* 0: set when SIGUSR2 arrived */
	volatile int loaded; /* 4: set by the assembly once every register holds its value */
};

void hold_avx512(const void *zin, const uint64_t *kin, void *zout, uint64_t *kout, struct hold_flags *flags,
		 struct misc *misc);
void hold_avx(const void *yin, const uint64_t *kin, void *yout, uint64_t *kout, struct hold_flags *flags,
	      struct misc *misc);

static struct hold_flags flags;

static void on_usr2(int sig)
{
	(void)sig;
	flags.stop = 1;
}

/* Reports ready only once the registers are loaded, so that the dump cannot catch the main
 * thread before its state is set up; then it just sleeps, a second (idle) thread. */
static void *reporter(void *arg)
{
	const char *text = arg;
	while (!flags.loaded) {
		struct timespec ts = { 0, 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	wl_ready_with(text);
	for (;;)
		pause();
	return NULL;
}

static uint8_t vin[32 * 64] __attribute__((aligned(64)));
static uint8_t vout[32 * 64] __attribute__((aligned(64)));
static uint64_t kin[8], kout[8];
static struct misc misc;

static int os_has_avx512(void)
{
	unsigned a, b, c, d;
	if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 16)))
		return 0;
	unsigned lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return (lo & 0xe6) == 0xe6; /* SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM enabled by the OS */
}

int main(int argc, char **argv)
{
	wl_init(argc, argv);
	int avx512 = os_has_avx512() && strcmp(wl_opt("--isa", "auto"), "avx") != 0;
	for (size_t i = 0; i < sizeof vin; i++)
		vin[i] = (uint8_t)(i * 37 + 11);
	for (int i = 0; i < 8; i++)
		kin[i] = 0x0101010101010101ULL * (uint64_t)(i + 1) ^ 0xa5a5a5a500000000ULL;
	misc.cw_in = 0x0c7f;      /* round toward zero, all exceptions masked */
	misc.mxcsr_in = 0x7f80;   /* round toward zero */
	misc.a_in = 3.14159265358979323846264338327950288L;
	misc.b_in = -2.71828182845904523536028747135266250L;

	static char ready[32];
	snprintf(ready, sizeof ready, "isa=%s\n", avx512 ? "avx512" : "avx");
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	pthread_t helper;
	if (pthread_create(&helper, NULL, reporter, ready))
		wl_die("pthread_create");
	if (avx512)
		hold_avx512(vin, kin, vout, kout, &flags, &misc);
	else
		hold_avx(vin, kin, vout, kout, &flags, &misc);

	int nregs = avx512 ? 32 : 16, width = avx512 ? 64 : 32;
	for (int r = 0; r < nregs; r++)
		if (memcmp(vin + r * width, vout + r * width, (size_t)width))
			wl_fail("%s%d differs", avx512 ? "zmm" : "ymm", r);
	if (avx512)
		for (int k = 0; k < 8; k++)
			if (kin[k] != kout[k])
				wl_fail("k%d is %#llx, expected %#llx", k, (unsigned long long)kout[k], (unsigned long long)kin[k]);
	static const uint64_t gpr[5] = { 0x1111222233334444ULL, 0x5555666677778888ULL, 0x99990000aaaabbbbULL,
					 0xccccddddeeeeffffULL, 0x0123456789abcdefULL };
	static const char *gpr_name[5] = { "rbx", "r12", "r13", "r14", "r15" };
	for (int i = 0; i < 5; i++)
		if (misc.gpr_out[i] != gpr[i])
			wl_fail("%s is %#llx", gpr_name[i], (unsigned long long)misc.gpr_out[i]);
	if (memcmp(&misc.st0_out, &misc.b_in, 10))
		wl_fail("x87 st0 differs");
	if (memcmp(&misc.st1_out, &misc.a_in, 10))
		wl_fail("x87 st1 differs");
	if (misc.cw_out != misc.cw_in)
		wl_fail("x87 control word %#x, expected %#x", misc.cw_out, misc.cw_in);
	if ((misc.mxcsr_out & ~0x3fu) != misc.mxcsr_in)
		wl_fail("MXCSR %#x, expected %#x", misc.mxcsr_out, misc.mxcsr_in);
	wl_finish();
}
