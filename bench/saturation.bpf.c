// SPDX-License-Identifier: GPL-2.0
/* Trivial counters for bench/saturation.py: on each hook the saturation family uses, the work
 * bpftrace's `@ = count()` does (one per-CPU hash lookup and an increment), as a tp_btf program
 * like the family's. The family's programs are judged as a ratio against these, run side by
 * side under the same load. */
#include "common.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

static __always_inline int count(__u32 hook)
{
	__u64 one = 1, *n = bpf_map_lookup_elem(&counts, &hook);

	if (n)
		*n += 1;
	else
		bpf_map_update_elem(&counts, &hook, &one, BPF_ANY);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(count_sched_switch) { return count(0); }
SEC("tp_btf/sched_wakeup")
int BPF_PROG(count_sched_wakeup) { return count(1); }
SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(count_sched_wakeup_new) { return count(2); }
SEC("tp_btf/block_rq_issue")
int BPF_PROG(count_block_rq_issue) { return count(3); }
SEC("tp_btf/block_rq_complete")
int BPF_PROG(count_block_rq_complete) { return count(4); }
SEC("tp_btf/consume_skb")
int BPF_PROG(count_consume_skb) { return count(5); }
SEC("tp_btf/kfree_skb")
int BPF_PROG(count_kfree_skb) { return count(6); }
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(count_inet_sock_set_state) { return count(7); }
SEC("tp_btf/mark_victim")
int BPF_PROG(count_mark_victim) { return count(8); }
SEC("tp_btf/block_rq_insert")
int BPF_PROG(count_block_rq_insert) { return count(9); }
