// SPDX-License-Identifier: GPL-2.0
/* One trivial program per hook type. The agent loads and attaches each on its own at
 * start-up: what loads and attaches here is what the probes may use on this kernel. */
#include "common.h"

char LICENSE[] SEC("license") = "GPL";

SEC("tp/syscalls/sys_enter_getppid")
int feature_tp(void *ctx) { return 0; }

SEC("tp_btf/sched_process_fork")
int BPF_PROG(feature_tp_btf, struct task_struct *parent, struct task_struct *child) { return 0; }

SEC("raw_tp/sched_process_fork")
int feature_raw_tp(void *ctx) { return 0; }

SEC("kprobe/tcp_close")
int BPF_KPROBE(feature_kprobe, struct sock *sk) { return 0; }

SEC("fentry/tcp_close")
int BPF_PROG(feature_fentry, struct sock *sk) { return 0; }

/* Attached by function name to libc's getppid; see runtime/features.py. */
SEC("uprobe")
int BPF_KPROBE(feature_uprobe) { return 0; }

/* `probewire doctor`'s check of the security kill action: SIGKILL, from the exec hook, to the
 * one process whose exec it waits for (src/probewire/security/enforce.py). */
const volatile __u32 send_signal_target = 0;

static __always_inline int kill_target(void)
{
	if (send_signal_target && (bpf_get_current_pid_tgid() >> 32) == send_signal_target)
		bpf_send_signal(9);
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(feature_send_signal_btf, struct task_struct *p) { return kill_target(); }

SEC("tp/sched/sched_process_exec")
int feature_send_signal_tp(void *ctx) { return kill_target(); }
