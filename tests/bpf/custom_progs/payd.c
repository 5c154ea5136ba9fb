/* A payment service stand-in for tests/bpf/test_custom.py: reads commands on stdin,
 *   call <amount> <currency> <merchant>   calls process_payment once
 *   sync                                  prints "ok" once every call before it returned
 *   loop <n>                              calls it n times, prints the elapsed nanoseconds
 * process_payment fails (returns -1) when the amount is a multiple of 7. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/sdt.h>
#include <time.h>

struct payment {
	uint64_t id;
	uint64_t amount;
	const char *merchant;
};

__attribute__((noinline)) int process_payment(struct payment *p, uint32_t currency)
{
	/* Keeps the call (and its arguments) from being optimised away. */
	__asm__ volatile("" : : "r"(p), "r"(currency) : "memory");
	DTRACE_PROBE3(payd, payment_done, p->amount, currency, p->merchant);
	return p->amount % 7 == 0 ? -1 : 0;
}

int main(void)
{
	char line[256], merchant[64];
	unsigned long long amount;
	unsigned currency;
	uint64_t id = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof(line), stdin)) {
		if (sscanf(line, "call %llu %u %63s", &amount, &currency, merchant) == 3) {
			struct payment p = {++id, amount, merchant};

			process_payment(&p, currency);
		} else if (sscanf(line, "loop %llu", &amount) == 1) {
			struct timespec t0, t1;
			struct payment p = {0, 0, "bench"};

			clock_gettime(CLOCK_MONOTONIC, &t0);
			for (unsigned long long i = 0; i < amount; i++) {
				p.amount = i;
				process_payment(&p, i & 3);
			}
			clock_gettime(CLOCK_MONOTONIC, &t1);
			printf("%lld\n", (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL +
						  (t1.tv_nsec - t0.tv_nsec));
		} else if (strncmp(line, "sync", 4) == 0) {
			printf("ok\n");
		}
	}
	return 0;
}
