// SPDX-License-Identifier: GPL-2.0
/* The l7 family for kernels without bpf_loop (before 5.17): see bpf/l7/bounded.h. */
#define L7_BOUNDED 1
#include "l7.bpf.c"
