// SPDX-License-Identifier: GPL-2.0
/* Refused by every verifier: it dereferences a random number. tests/bpf/test_verifier_errors.py
 * loads it to check that the error names this program and quotes the verifier. */
#include "common.h"

char LICENSE[] SEC("license") = "GPL";

SEC("tp/syscalls/sys_enter_getpid")
int reads_a_number_as_a_pointer(void *ctx)
{
	return *(int *)(unsigned long)bpf_get_prandom_u32();
}
