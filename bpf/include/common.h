/* Shared by every probe family: the filter map, log2 buckets, ring reserve-or-count-drop. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#define TASK_COMM_LEN 16
#define LOG2_SLOTS 32

/* Filter modes (filter_config.flags). With no flag set every event is traced. */
#define FILTER_PIDS (1U << 0)
#define FILTER_CGROUPS (1U << 1)
#define FILTER_PORTS (1U << 2)

struct filter_config {
	__u32 flags;
};

/* Run-time settings live in maps the agent updates while running; the agent creates them
 * once and shares them between all objects (bpf_map__reuse_fd). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct filter_config);
} filter_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} filter_pids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} filter_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} filter_ports SEC(".maps");

/* probewire_events_dropped_total{probe}: one slot, per CPU so the hot path never contends. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} events_dropped SEC(".maps");

/* One ring per family; user space resizes it before load (bpf_map__set_max_entries). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} events SEC(".maps");

/* Kernel struct fields are read with plain loads through bpf_rdonly_cast (a kfunc the verifier
 * turns into a register move; Linux 6.2+): a bpf_probe_read_kernel call per field costs more
 * than the rest of a typical handler. It is declared weak, so on kernels without it the loader
 * resolves it to nothing and the verifier keeps the BPF_CORE_READ path; `use_kfuncs` (a
 * load-time setting) lets tests cover that path here too. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;
const volatile __u8 use_kfuncs = 1;
#define KFUNCS (use_kfuncs && bpf_rdonly_cast)
#define CAST(type, p) ((type *)bpf_rdonly_cast((const void *)(p), bpf_core_type_id_kernel(type)))
/* One field of a kernel object, e.g. KREAD(struct sock, sk, __sk_common.skc_num). */
#define KREAD(type, p, field) \
	(KFUNCS ? CAST(type, p)->field : BPF_CORE_READ((const type *)(p), field))
/* `size` bytes of a kernel object's field into BPF memory. */
#define KCOPY(dst, size, type, p, field)                                     \
	do {                                                                 \
		if (KFUNCS)                                                  \
			__builtin_memcpy(dst, &CAST(type, p)->field, size);  \
		else                                                         \
			bpf_core_read(dst, size, &((const type *)(p))->field); \
	} while (0)

/* A port of 0 means "no port" (process events), which never rejects. */
static __always_inline bool is_traced(__u32 tgid, __u64 cgroup_id, __u16 port_a, __u16 port_b)
{
	__u32 zero = 0;
	struct filter_config *cfg = bpf_map_lookup_elem(&filter_config, &zero);

	if (!cfg || !cfg->flags)
		return true;
	if ((cfg->flags & FILTER_PIDS) && !bpf_map_lookup_elem(&filter_pids, &tgid))
		return false;
	if ((cfg->flags & FILTER_CGROUPS) && !bpf_map_lookup_elem(&filter_cgroups, &cgroup_id))
		return false;
	if ((cfg->flags & FILTER_PORTS) && (port_a || port_b) &&
	    !bpf_map_lookup_elem(&filter_ports, &port_a) &&
	    !bpf_map_lookup_elem(&filter_ports, &port_b))
		return false;
	return true;
}

/* The same check for the current task: its cgroup id is looked up only when a cgroup filter
 * is set (it costs a walk of the task's css_set on every call). */
static __always_inline bool is_traced_task(__u32 tgid, __u16 port_a, __u16 port_b)
{
	__u32 zero = 0;
	struct filter_config *cfg = bpf_map_lookup_elem(&filter_config, &zero);

	if (!cfg || !cfg->flags)
		return true;
	return is_traced(tgid, (cfg->flags & FILTER_CGROUPS) ? bpf_get_current_cgroup_id() : 0,
			 port_a, port_b);
}

static __always_inline void count_drop(void)
{
	__u32 zero = 0;
	__u64 *drops = bpf_map_lookup_elem(&events_dropped, &zero);

	if (drops)
		*drops += 1;
}

/* Load-time setting: wake the reader when a record lands in an empty ring (the first after a
 * quiet spell, so a lone event is not held for the flush timer) and when a record makes a
 * multiple of this many wait (the user-space batch size). Records in between are found by the
 * reader's flush timer (ring.flush_ms): a wake-up per record would cost a Python loop
 * iteration per record, the very thing batching is for. Under a backlog, too, a wake-up comes
 * once per batch, not per record: each forced wake-up costs the writer (the traced workload)
 * an irq_work, and waking on every record past the batch size held writers to ~0.5 M
 * records/s (bench/ring_flood.py). Records written side by side on several CPUs can step over
 * a multiple; the next multiple, or the flush timer, then wakes the reader: late, never lost.
 * `reserved`: the record is already counted in the ring's data. */
const volatile __u32 wakeup_records = 128;

static __always_inline __u64 wakeup_flags(void *ring, __u64 record_size, bool reserved)
{
	__u64 stride = (record_size + 8 + 7) & ~7ULL;
	/* Records waiting, this one counted. */
	__u64 waiting = (bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA) + (reserved ? 0 : stride)) /
			stride;
	__u64 batch = wakeup_records ? wakeup_records : 1;

	if (waiting <= 1 || waiting % batch == 0)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

/* Never block the kernel: a full ring drops the record and counts it. */
#define RESERVE_OR_DROP(type)                                                   \
	({                                                                      \
		type *__rec = bpf_ringbuf_reserve(&events, sizeof(type), 0);    \
		if (!__rec)                                                     \
			count_drop();                                           \
		__rec;                                                          \
	})

/* floor(log2(v)) without a clz instruction (the BPF ISA has none). */
static __always_inline __u32 log2_u32(__u32 v)
{
	__u32 r, shift;

	r = (v > 0xFFFF) << 4;
	v >>= r;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (v >> 1);
	return r;
}

/* Slot 0 holds v == 0; slot i > 0 holds 2^(i-1) <= v < 2^i; the last slot is open-ended.
 * aggregate/histogram.py turns slots into Prometheus buckets with le = 2^i units. */
static __always_inline __u32 log2_slot(__u64 v)
{
	__u32 hi = v >> 32, slot;

	if (!v)
		return 0;
	slot = (hi ? log2_u32(hi) + 32 : log2_u32((__u32)v)) + 1;
	slot = slot < LOG2_SLOTS ? slot : LOG2_SLOTS - 1;
	/* The clamp above compiles to a compare on a copy of the register; verifiers before 5.13
	 * or so do not carry that bound back ("unbounded memory access" on 5.10). A mask the
	 * compiler cannot drop bounds the register that indexes the slots. */
	barrier_var(slot);
	return slot & (LOG2_SLOTS - 1);
}
