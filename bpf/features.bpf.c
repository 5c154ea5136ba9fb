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
