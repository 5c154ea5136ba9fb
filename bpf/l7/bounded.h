/* The l7 family on kernels before 5.17 (Debian bullseye's 5.10): bpf/l7_bounded.bpf.c builds
 * the same sources with L7_BOUNDED defined, and user space loads that object where the kernel
 * lacks bpf_loop, task storage, bpf_task_pt_regs or bpf_get_current_task_btf (probes/l7.py).
 * What differs, each in an #ifdef L7_BOUNDED block next to what it replaces:
 *   bpf_loop (5.17)          L7_LOOP: a bounded for loop; the long walks get smaller bounds
 *                            (L7_BOUNDED_PIECES, H2_BOUNDED_PIECES) and what they cut is
 *                            counted as truncated, as past the bpf_loop bounds
 *   bpf_task_pt_regs (5.15)  the data syscalls' arguments parked at their enter tracepoints
 *                            in l7_sys_args (a hash by thread), read back at the exit; an
 *                            exit that finds none (the call began before the agent attached,
 *                            or its entry was pushed out) is counted: L7_COV_NO_SYS_ENTER,
 *                            probewire_l7_missed_calls{reason="no_sys_enter"}
 *   task storage (5.11)      tls_calls is a hash by thread
 *   current_task_btf (5.11)  the task's fields by probe reads
 *   global functions taking pointers (5.12): static subprograms (L7_GLOBAL), verified at each
 *                            call site instead of once
 * An object, not const volatile branches: a bpf_loop callback is referenced by a
 * ld_imm64 the 5.10 verifier refuses even in code it would find dead. */
#pragma once

#ifdef L7_BOUNDED
/* The step is a global function (fn##_bounded(i), defined next to fn): the verifier checks it
 * once, and the loop around its calls costs a few instructions a step. A static step would be
 * checked again at every step (the loop counter is precise), which no parser fits in 1M
 * instructions. Global functions take scalars only before 5.12: a step that needs the bytes
 * of a head finds them in map memory (http_parse.h, head_copy). */
#define L7_LOOP(n, n_bounded, fn, ctx)                                                        \
	do {                                                                                  \
		for (__u32 l7_i_ = 0; l7_i_ < (n_bounded); l7_i_++)                           \
			if (fn##_bounded(l7_i_))                                              \
				break;                                                        \
	} while (0)
/* A global step for a callback that ignores its context. */
#define L7_BOUNDED_STEP(fn)                                                                   \
	__noinline int fn##_bounded(__u32 i)                                                  \
	{                                                                                     \
		return fn(i, NULL) != 0;                                                      \
	}
#define L7_GLOBAL static __noinline
#define L7_IS_BOUNDED 1
#else
#define L7_IS_BOUNDED 0
#define L7_LOOP(n, n_bounded, fn, ctx) bpf_loop(n, fn, ctx, 0)
#define L7_BOUNDED_STEP(fn)
#define L7_GLOBAL __noinline
#endif
