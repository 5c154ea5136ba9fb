// SPDX-License-Identifier: GPL-2.0
/* saturation family: run-queue latency, CPU time and off-CPU waits (sched), block I/O latency,
 * TCP listen-queue overflows, OOM kills. Everything but the (rare) OOM kills is counted in
 * kernel maps keyed by process, device or listener, and read at scrape. */
#include "common.h"
#include <bpf/bpf_endian.h>
#include "saturation.h"

char LICENSE[] SEC("license") = "GPL";

/* Puts the record type in the object's BTF, where user space checks its dtype. */
struct oom_event *btf_export_oom_event __attribute__((unused));

#define TASK_RUNNING_ 0
#define TASK_UNINTERRUPTIBLE_ 0x2
#define TASK_NOLOAD_ 0x400
#define TASK_FROZEN_ 0x8000
#define PF_KTHREAD_ 0x00200000
#define TCP_LISTEN_ 10
#define MAX_CPUS 1024
/* PAGE_COUNTER_MAX for 4 KiB pages: a memory cgroup without a limit. */
#define PAGE_COUNTER_MAX_ (0x7fffffffffffffffUL / 4096)
/* A cgroup whose usage is this close to its limit (in pages) is the one that ran out: the
 * failed charge was at most 8 pages (memcg OOM gives up on costlier orders), and frees may
 * have come in before the victim is marked. */
#define OOM_SLACK_PAGES 64

/* Load-time settings: which signals run (the config's switches), and how state is kept. */
const volatile __u8 sched_cpu_on = 1;
const volatile __u8 sched_runq_on = 1;
/* Per-thread state in task storage: only when every sched hook is tp_btf (a tp/ program is
 * told only the pid of the task switched in, so it keys state by thread id in an LRU hash). */
const volatile __u8 use_task_storage = 1;
/* Requests keyed by their address when both block hooks are tp_btf, else by start sector. */
const volatile __u8 block_key_by_rq = 1;
/* Where tcp_rcv_state_process lies (from /proc/kallsyms: its address, the next symbol's): the
 * only function that consumes a SYN a listener answered or dropped. */
const volatile __u64 tcp_rcv_state_process_start = 0;
const volatile __u64 tcp_rcv_state_process_end = 0;
const volatile __u32 nr_cpus = 1;
/* bpf_get_current_task_btf (5.11); without it the current task is a plain pointer that is read
 * field by field (bpf_get_current_task, BPF_CORE_READ). */
const volatile __u8 have_current_task_btf = 1;

/* A field of a task: a plain load through a BTF pointer (tp_btf arguments,
 * bpf_get_current_task_btf), a probe read through a plain one (bpf_get_current_task). `btf` is a
 * constant at every call, so each program keeps one of the two. */
#define TASK_FIELD(btf, t, field) ((btf) ? (t)->field : BPF_CORE_READ((t), field))

/* --- sched -------------------------------------------------------------------------------- */

/* Backs probewire_process_cpu_seconds_total, probewire_sched_runqueue_latency_seconds and
 * probewire_sched_wait_seconds_total: bounded by LRU; user space sizes it by CPU count. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct sched_stats);
} sched_stats SEC(".maps");

/* Per-thread state that dies with the thread. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sched_task);
} sched_tasks SEC(".maps");

/* The same for tp/ programs, by thread id; LRU so exited threads cannot fill it (user space
 * shrinks it to one entry when task storage is used). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct sched_task);
} sched_threads SEC(".maps");

static struct sched_stats zero_sched_stats;
static struct sched_task zero_task;

static __always_inline struct sched_task *thread_state(struct task_struct *t, __u32 tid,
							bool create)
{
	struct sched_task *ts;

	if (use_task_storage && t)
		return bpf_task_storage_get(&sched_tasks, t, 0,
					    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
	ts = bpf_map_lookup_elem(&sched_threads, &tid);
	if (ts || !create)
		return ts;
	bpf_map_update_elem(&sched_threads, &tid, &zero_task, BPF_NOEXIST);
	return bpf_map_lookup_elem(&sched_threads, &tid);
}

static __always_inline struct sched_stats *sched_stats_for(__u32 tgid)
{
	struct sched_stats *s = bpf_map_lookup_elem(&sched_stats, &tgid);

	if (s)
		return s;
	bpf_map_update_elem(&sched_stats, &tgid, &zero_sched_stats, BPF_NOEXIST);
	return bpf_map_lookup_elem(&sched_stats, &tgid);
}

struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

static __always_inline long run_state(struct task_struct *t, bool btf)
{
	/* Renamed to __state in 5.14 (2f064a59a11f). */
	if (bpf_core_field_exists(t->__state))
		return TASK_FIELD(btf, t, __state);
	return TASK_FIELD(btf, (struct task_struct___pre514 *)t, state);
}

/* The current task's process, or SAT_KERNEL_TGID for a kernel thread. */
static __always_inline __u32 current_tgid_or_kernel(void)
{
	struct task_struct *t;

	if (have_current_task_btf) {
		t = bpf_get_current_task_btf();
		return (t->flags & PF_KTHREAD_) ? SAT_KERNEL_TGID : t->tgid;
	}
	t = (struct task_struct *)bpf_get_current_task();
	return (BPF_CORE_READ(t, flags) & PF_KTHREAD_) ? SAT_KERNEL_TGID : BPF_CORE_READ(t, tgid);
}

/* What the load average counts: uninterruptible, not idle-marked, not frozen. */
static __always_inline bool uninterruptible(long state)
{
	return (state & TASK_UNINTERRUPTIBLE_) && !(state & (TASK_NOLOAD_ | TASK_FROZEN_));
}

/* prev leaves the CPU: its CPU time and the waits that ended since it last left go to its
 * process; then it starts waiting for a CPU (still runnable) or for I/O (uninterruptible).
 * prev is the current task: a BTF pointer (`btf`) or a plain one (tp/ programs). */
static __always_inline void switch_out(struct task_struct *prev, __u32 tid, __u64 now, bool btf)
{
	/* Task storage takes BTF pointers only (the tp/ path keys by thread id). */
	struct sched_task *ts = thread_state(btf ? prev : NULL, tid, true);
	__u64 sum, cpu_ns = 0;
	struct sched_stats *s;
	__u32 tgid;
	long state;

	if (!ts)
		return;
	sum = TASK_FIELD(btf, prev, se.sum_exec_runtime);
	if (sched_cpu_on && ts->has_sum)
		cpu_ns = sum - ts->last_sum_exec_ns;
	ts->last_sum_exec_ns = sum;
	ts->has_sum = 1;
	if (cpu_ns || ts->pending_runq || ts->pending_io_ns || ts->pending_blocked_ns) {
		tgid = (TASK_FIELD(btf, prev, flags) & PF_KTHREAD_) ? SAT_KERNEL_TGID
								    : TASK_FIELD(btf, prev, tgid);
		if (tgid == SAT_KERNEL_TGID || is_traced_task(tgid, 0, 0)) {
			s = sched_stats_for(tgid);
			if (s) {
				s->cpu_ns += cpu_ns;
				if (ts->pending_runq) {
					s->runq_ns += ts->pending_runq_ns;
					s->runq_waits += 1;
					s->runq_us_slots[log2_slot(ts->pending_runq_ns / 1000) &
							 (LOG2_SLOTS - 1)] += 1;
				}
				s->io_ns += ts->pending_io_ns;
				s->blocked_ns += ts->pending_blocked_ns;
			}
		}
		ts->pending_runq = 0;
		ts->pending_runq_ns = 0;
		ts->pending_io_ns = 0;
		ts->pending_blocked_ns = 0;
	}
	if (!sched_runq_on)
		return;
	state = run_state(prev, btf);
	/* As the kernel's sched_info: a preempted task waits from now; a task that goes to sleep
	 * stops waiting (a wake-up that came while it was still on the CPU is void). */
	ts->queued_ns = state == TASK_RUNNING_ ? now : 0;
	if (uninterruptible(state)) {
		ts->slept_ns = now;
		ts->slept_io = btf ? BPF_CORE_READ_BITFIELD(prev, in_iowait)
				   : BPF_CORE_READ_BITFIELD_PROBED(prev, in_iowait);
	}
}

/* next gets the CPU: its run-queue wait ends. `next` is NULL for tp/ programs. */
static __always_inline void switch_in(struct task_struct *next, __u32 tid, __u64 now)
{
	struct sched_task *ts = thread_state(next, tid, false);

	if (!ts || !ts->queued_ns)
		return;
	ts->pending_runq_ns = now - ts->queued_ns;
	ts->pending_runq = 1;
	ts->queued_ns = 0;
}

static __always_inline int handle_switch(struct task_struct *prev, struct task_struct *next,
					 __u32 next_tid, bool btf)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 prev_tid = TASK_FIELD(btf, prev, pid);

	if (prev_tid) /* 0: the idle task */
		switch_out(prev, prev_tid, now, btf);
	if (next_tid && sched_runq_on)
		switch_in(next, next_tid, now);
	return 0;
}

/* Runs on every context switch (hundreds of thousands a second on a busy host): two per-thread
 * state lookups and one per-process map lookup, nothing else. */
SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch_btf, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	return handle_switch(prev, next, next->pid, true);
}

SEC("tp/sched/sched_switch")
int sched_switch_tp(struct trace_event_raw_sched_switch *ctx)
{
	/* The switch has not happened yet: the current task is prev. A plain pointer, read field by
	 * field: bpf_get_current_task_btf came in 5.11, and this path is the fallback anyway. */
	return handle_switch((struct task_struct *)bpf_get_current_task(), NULL, ctx->next_pid,
			     false);
}

/* A task becomes runnable: it waits for a CPU from now; an uninterruptible sleep ends. */
static __always_inline int handle_wakeup(struct task_struct *p, __u32 tid, bool new_task)
{
	__u64 now = bpf_ktime_get_ns(), slept;
	struct sched_task *ts = thread_state(p, tid, true);

	if (!ts)
		return 0;
	if (new_task) {
		ts->last_sum_exec_ns = 0; /* a new task has run for 0 ns */
		ts->has_sum = 1;
	} else if (p && !ts->has_sum) {
		ts->last_sum_exec_ns = p->se.sum_exec_runtime;
		ts->has_sum = 1;
	}
	if (!ts->queued_ns)
		ts->queued_ns = now;
	if (ts->slept_ns) {
		slept = now - ts->slept_ns;
		if (ts->slept_io)
			ts->pending_io_ns += slept;
		else
			ts->pending_blocked_ns += slept;
		ts->slept_ns = 0;
	}
	return 0;
}

/* Wake-ups: one per-thread state lookup each. */
SEC("tp_btf/sched_wakeup")
int BPF_PROG(sched_wakeup_btf, struct task_struct *p)
{
	return handle_wakeup(p, p->pid, false);
}

SEC("tp/sched/sched_wakeup")
int sched_wakeup_tp(struct trace_event_raw_sched_wakeup_template *ctx)
{
	return handle_wakeup(NULL, ctx->pid, false);
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(sched_wakeup_new_btf, struct task_struct *p)
{
	return handle_wakeup(p, p->pid, true);
}

SEC("tp/sched/sched_wakeup_new")
int sched_wakeup_new_tp(struct trace_event_raw_sched_wakeup_template *ctx)
{
	return handle_wakeup(NULL, ctx->pid, true);
}

/* --- block -------------------------------------------------------------------------------- */

/* Requests in flight; LRU so a completion the agent never sees cannot leak an entry. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct block_req_key);
	__type(value, struct block_req);
} block_reqs SEC(".maps");

/* Backs probewire_block_io_duration_seconds and probewire_block_io_bytes_total. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 2048);
	__type(key, struct block_key);
	__type(value, struct block_stats);
} block_stats SEC(".maps");

static struct block_stats zero_block_stats;

static __always_inline __u8 op_of_req(__u32 cmd_flags)
{
	switch (cmd_flags & 0xff) { /* REQ_OP_MASK */
	case 0: /* REQ_OP_READ */
		return BLOCK_OP_READ;
	case 1: /* REQ_OP_WRITE */
	case 7: /* REQ_OP_ZONE_APPEND */
		return BLOCK_OP_WRITE;
	case 2: /* REQ_OP_FLUSH */
		return BLOCK_OP_FLUSH;
	case 3: /* REQ_OP_DISCARD */
	case 5: /* REQ_OP_SECURE_ERASE */
		return BLOCK_OP_DISCARD;
	}
	return BLOCK_OP_OTHER;
}

/* blk_fill_rwbs: an optional 'F' (pre-flush) before the operation letter; 'F' alone is a
 * flush. */
static __always_inline __u8 op_of_rwbs(char c, char next)
{
	if (c == 'F' && (next == 'W' || next == 'R' || next == 'D' || next == 'N'))
		c = next;
	switch (c) {
	case 'R':
		return BLOCK_OP_READ;
	case 'W':
		return BLOCK_OP_WRITE;
	case 'F':
		return BLOCK_OP_FLUSH;
	case 'D':
		return BLOCK_OP_DISCARD;
	}
	return BLOCK_OP_OTHER;
}

/* Where the request queue has no disk pointer (5.10), the request names its disk itself. */
struct request___old {
	struct gendisk *rq_disk;
} __attribute__((preserve_access_index));

static __always_inline __u32 rq_dev(struct request *rq)
{
	struct gendisk *disk = bpf_core_field_exists(rq->q->disk)
		? rq->q->disk : ((struct request___old *)rq)->rq_disk;

	/* The tracepoints' dev: disk_devt(), MKDEV(major, first_minor) in the kernel's layout. */
	return disk ? ((__u32)disk->major << 20) | (__u32)disk->first_minor : 0;
}

/* The process that issued the request, or "kernel" (writeback, journal, a driver's worker). */
static __always_inline __u32 issuer(void)
{
	return current_tgid_or_kernel();
}

/* A request is queued for later issue (an I/O scheduler's queue, a hardware queue's dispatch
 * list) by the task that submitted it; kblockd (a kworker) issues it. Debian 6.1 issues every
 * direct write to a loop device so: insert by the writer, issue by kworker/N:1H. The submitter
 * is kept here (issue_ns 0: not issued yet) for the issue to count the request for it. */
static __always_inline int handle_insert(__u64 id, __u32 dev, __u8 op)
{
	struct block_req_key key = { .id = id, .dev = dev, .op = op };
	struct block_req req = { .op = op };
	struct block_req *known;

	req.tgid = issuer();
	if (req.tgid == SAT_KERNEL_TGID) {
		/* kblockd queues again what the driver sent back (a requeue): still its issuer's */
		known = bpf_map_lookup_elem(&block_reqs, &key);
		if (known) {
			known->issue_ns = 0;
			return 0;
		}
	}
	bpf_map_update_elem(&block_reqs, &key, &req, BPF_ANY);
	return 0;
}

static __always_inline int handle_issue(__u64 id, __u32 dev, __u32 bytes, __u8 op)
{
	struct block_req_key key = { .id = id, .dev = dev, .op = op };
	struct block_req req = { .issue_ns = bpf_ktime_get_ns(), .bytes = bytes, .op = op };
	struct block_req *queued = bpf_map_lookup_elem(&block_reqs, &key);

	/* What was queued goes out from kblockd, or from whichever task runs the queue next (with
	 * an I/O scheduler, one task's submission dispatches the others' requests): it counts for
	 * its submitter. Stale entries cannot mislead: without a scheduler nothing merges after
	 * the insert, and with one every request is inserted afresh. */
	req.tgid = issuer();
	if (queued && !queued->issue_ns)
		req.tgid = queued->tgid;
	if (req.tgid != SAT_KERNEL_TGID && !is_traced_task(req.tgid, 0, 0)) {
		if (queued)
			bpf_map_delete_elem(&block_reqs, &key);
		return 0;
	}
	bpf_map_update_elem(&block_reqs, &key, &req, BPF_ANY);
	return 0;
}

/* `empty`: the request carries no data, so it may have completed without ever being issued:
 * the flush machinery ends an empty pre-flush write (fsync's) itself once the device's cache
 * flush is done, and /proc/diskstats still counts it as a write. */
static __always_inline int handle_complete(__u64 id, __u32 dev, __u8 op, bool empty)
{
	struct block_req_key rkey = { .id = id, .dev = dev, .op = op };
	struct block_req *req = bpf_map_lookup_elem(&block_reqs, &rkey);
	struct block_key key = { .dev = dev };
	struct block_stats *s;
	__u64 ns = 0;

	if (req && req->issue_ns) {
		ns = bpf_ktime_get_ns() - req->issue_ns;
		key.tgid = req->tgid;
		key.op = req->op;
	} else if (empty) {
		/* its submitter when it was queued (handle_insert), else whoever is on the CPU */
		key.tgid = issuer();
		if (req)
			key.tgid = req->tgid;
		key.op = op;
		if (key.tgid != SAT_KERNEL_TGID && !is_traced_task(key.tgid, 0, 0)) {
			bpf_map_delete_elem(&block_reqs, &rkey);
			return 0;
		}
		ns = 0;
	} else {
		/* issued before the agent started, or filtered out; or queued and never issued */
		if (req)
			bpf_map_delete_elem(&block_reqs, &rkey);
		return 0;
	}
	s = bpf_map_lookup_elem(&block_stats, &key);
	if (!s) {
		bpf_map_update_elem(&block_stats, &key, &zero_block_stats, BPF_NOEXIST);
		s = bpf_map_lookup_elem(&block_stats, &key);
	}
	if (s) {
		s->ios += 1;
		s->bytes += req ? req->bytes : 0;
		s->ns_sum += ns;
		s->us_slots[log2_slot(ns / 1000) & (LOG2_SLOTS - 1)] += 1;
	}
	if (req)
		bpf_map_delete_elem(&block_reqs, &rkey);
	return 0;
}

/* A request is queued: one map update per queued request (none for those issued at once). */
SEC("tp_btf/block_rq_insert")
int BPF_PROG(block_rq_insert_btf, struct request *rq)
{
	__u64 id = block_key_by_rq ? (__u64)rq : (rq->__sector == (__u64)-1 ? 0 : rq->__sector);

	return handle_insert(id, rq_dev(rq), op_of_req(rq->cmd_flags));
}

SEC("tp/block/block_rq_insert")
int block_rq_insert_tp(struct trace_event_raw_block_rq *ctx)
{
	char c0 = ctx->rwbs[0], c1 = ctx->rwbs[1];

	return handle_insert(ctx->sector, ctx->dev, op_of_rwbs(c0, c1));
}

/* A request goes to the driver: one map update per request (and a lookup when kblockd issues
 * it). */
SEC("tp_btf/block_rq_issue")
int BPF_PROG(block_rq_issue_btf, struct request *rq)
{
	__u64 id = block_key_by_rq ? (__u64)rq : (rq->__sector == (__u64)-1 ? 0 : rq->__sector);

	return handle_issue(id, rq_dev(rq), rq->__data_len, op_of_req(rq->cmd_flags));
}

SEC("tp/block/block_rq_issue")
int block_rq_issue_tp(struct trace_event_raw_block_rq *ctx)
{
	/* Two loads: the verifier allows no pointer arithmetic on the context. */
	char c0 = ctx->rwbs[0], c1 = ctx->rwbs[1];

	return handle_issue(ctx->sector, ctx->dev, ctx->bytes, op_of_rwbs(c0, c1));
}

/* A request (or part of it) completes: one lookup, one update, one delete per request. */
SEC("tp_btf/block_rq_complete")
int BPF_PROG(block_rq_complete_btf, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	__u64 id = block_key_by_rq ? (__u64)rq : (rq->__sector == (__u64)-1 ? 0 : rq->__sector);

	/* blk_update_request runs once per partial completion; the request is done with the last
	 * one, when what completes is all that was left. */
	if (nr_bytes < rq->__data_len)
		return 0;
	return handle_complete(id, rq_dev(rq), op_of_req(rq->cmd_flags), !rq->__data_len);
}

/* The event's record where it has no block_rq_completion class (5.10). */
struct trace_event_raw_block_rq_complete___old {
	dev_t dev;
	sector_t sector;
	unsigned int nr_sector;
	char rwbs[8];
} __attribute__((preserve_access_index));

SEC("tp/block/block_rq_complete")
int block_rq_complete_tp(struct trace_event_raw_block_rq_completion *ctx)
{
	struct trace_event_raw_block_rq_complete___old *old = (void *)ctx;
	char c0, c1;

	/* Partial completions cannot be told apart here: the first one ends the request. */
	if (!bpf_core_type_exists(struct trace_event_raw_block_rq_completion)) {
		c0 = old->rwbs[0];
		c1 = old->rwbs[1];
		return handle_complete(old->sector, old->dev, op_of_rwbs(c0, c1), !old->nr_sector);
	}
	c0 = ctx->rwbs[0];
	c1 = ctx->rwbs[1];
	return handle_complete(ctx->sector, ctx->dev, op_of_rwbs(c0, c1), !ctx->nr_sector);
}

/* --- TCP listen queues -------------------------------------------------------------------- */

/* A per-CPU allocation's copy for CPU i lives at its base address plus CPU i's per-CPU offset.
 * The offsets are not exported to BPF where the kernel's kallsyms hold no data symbols (as
 * here); this one-slot per-CPU array gives them: its base is in the map's struct bpf_array,
 * and a lookup returns a CPU's copy. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} cpu_anchor SEC(".maps");

/* CPU `cpu`'s per-CPU offset (this CPU's when this_cpu). */
static __always_inline bool cpu_offset(__u32 cpu, bool this_cpu, __u64 *off)
{
	__u32 zero = 0;
	void *copy = this_cpu ? bpf_map_lookup_elem(&cpu_anchor, &zero)
			      : bpf_map_lookup_percpu_elem(&cpu_anchor, &zero, cpu);
	void *map = &cpu_anchor;
	__u64 copy_addr, map_addr, base;

	if (!copy)
		return false;
	/* Pointers to integers: the verifier allows no arithmetic on a map or its values. */
	if (bpf_probe_read_kernel(&copy_addr, 8, &copy) ||
	    bpf_probe_read_kernel(&map_addr, 8, &map) ||
	    bpf_probe_read_kernel(&base, 8,
				  (void *)(map_addr + bpf_core_field_offset(struct bpf_array, pptrs))))
		return false;
	*off = copy_addr - base;
	return true;
}

/* Listening port -> the process that called listen(). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct listen_key);
	__type(value, struct listen_owner);
} listen_owners SEC(".maps");

/* Backs probewire_tcp_listen_overflows_total and probewire_tcp_listen_drops_total. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct listen_key);
	__type(value, struct listen_stats);
} listen_stats SEC(".maps");

/* Per network namespace (its cookie), per CPU: the namespace's counters on that CPU as last
 * attributed. The kernel bumps ListenOverflows/ListenDrops on the CPU that handles the packet
 * and, with bottom halves off, frees or consumes that packet before the CPU can handle another
 * one; so the growth of this CPU's counters seen at that free belongs to that listener. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct listen_mib);
} listen_base SEC(".maps");

/* Before 5.14 a namespace's cookie was an atomic64_t made on first request (0 for one nobody
 * asked about), and sockets could not tell it (SO_NETNS_COOKIE): there namespaces are keyed by
 * their inode number, which user space reads from /proc/<pid>/ns/net. */
struct net___pre514 {
	atomic64_t net_cookie;
} __attribute__((preserve_access_index));

static __always_inline __u64 netns_key(const struct net *net)
{
	if (bpf_core_field_exists(((struct net___pre514 *)net)->net_cookie.counter))
		return BPF_CORE_READ(net, ns.inum);
	return BPF_CORE_READ(net, net_cookie);
}

struct baseline_ctx {
	struct linux_mib *mib;
	__u64 netns;
};

/* Positions of ListenOverflows and ListenDrops in struct linux_mib. Its enum is anonymous, so
 * CO-RE cannot relocate them, and they moved (19 and 20 on 6.1, 23 and 24 on 6.18): user space
 * sets them from the running kernel's BTF. */
const volatile __u32 mib_listen_overflows = 0;
const volatile __u32 mib_listen_drops = 0;

static __always_inline void read_mib(struct linux_mib *mib, __u64 cpu_off,
				     struct listen_mib *out)
{
	const void *mine = (const void *)mib + cpu_off;

	bpf_probe_read_kernel(&out->overflows, 8, mine + (__u64)mib_listen_overflows * 8);
	bpf_probe_read_kernel(&out->drops, 8, mine + (__u64)mib_listen_drops * 8);
}

static long baseline_cpu(__u32 cpu, struct baseline_ctx *c)
{
	struct listen_mib *b;
	__u64 off;

	if (!cpu_offset(cpu, false, &off))
		return 1; /* past the last possible CPU */
	b = bpf_map_lookup_percpu_elem(&listen_base, &c->netns, cpu);
	if (!b)
		return 1;
	read_mib(c->mib, off, b);
	return 0;
}

/* The first time a namespace is seen (a listen() there, or a listener's first drop): read its
 * counters on every CPU; growth from then on is attributed. */
static __always_inline void take_baseline_loop(struct linux_mib *mib, __u64 netns)
{
	struct listen_mib zero = {};
	struct baseline_ctx c = { .mib = mib, .netns = netns };

	if (bpf_map_update_elem(&listen_base, &netns, &zero, BPF_NOEXIST))
		return;
	bpf_loop(nr_cpus < MAX_CPUS ? nr_cpus : MAX_CPUS, baseline_cpu, &c, 0);
}

/* --- the bounded-loop variant (kernels before 5.19) ---
 * The programs named *_bounded do what their twins do without bpf_loop (5.17) and
 * bpf_map_lookup_percpu_elem (5.19): the baselines are in a plain hash by namespace and CPU,
 * written by whichever CPU takes them, and the walk over CPUs is a bounded loop the verifier
 * follows CPU by CPU (as many as the machine has, known at load). Other CPUs' per-CPU offsets
 * come from cpu_offsets, filled once after load by test runs of record_cpu_offset on each CPU
 * (bpf_per_cpu_ptr on a kernel variable needs per-CPU variables in the kernel's BTF, which
 * Debian's 5.10 lacks). */

#define ALL_CPUS_ 0xffffffffU /* the key's cpu of a namespace's "baselines taken" mark */

struct listen_cpu_key {
	__u64 netns;
	__u32 cpu;
	__u32 _pad;
};

/* User space sizes it: a mark and one entry per CPU for each of 1024 namespaces. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct listen_cpu_key);
	__type(value, struct listen_mib);
} listen_base_cpus SEC(".maps");

/* CPU -> its per-CPU offset + 1 (0: not recorded yet). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CPUS);
	__type(key, __u32);
	__type(value, __u64);
} cpu_offsets SEC(".maps");

/* Run by user space on each CPU (BPF_PROG_TEST_RUN with BPF_F_TEST_RUN_ON_CPU, 5.10), never
 * attached. */
SEC("raw_tp/sys_enter")
int record_cpu_offset(void *ctx)
{
	__u32 cpu = bpf_get_smp_processor_id();
	__u64 off, *slot = bpf_map_lookup_elem(&cpu_offsets, &cpu);

	if (slot && cpu_offset(0, true, &off))
		*slot = off + 1;
	return 0;
}

/* This CPU's baseline of the namespace, taken now (its first event since the walk missed it:
 * a CPU whose offset was not recorded, or an entry the LRU dropped). */
static __always_inline void take_own_baseline(struct linux_mib *mib, __u64 netns)
{
	struct listen_cpu_key key = { .netns = netns, .cpu = bpf_get_smp_processor_id() };
	struct listen_mib now;
	__u64 off;

	if (!cpu_offset(0, true, &off))
		return;
	read_mib(mib, off, &now);
	bpf_map_update_elem(&listen_base_cpus, &key, &now, BPF_NOEXIST);
}

static __always_inline void take_baseline_bounded(struct linux_mib *mib, __u64 netns)
{
	struct listen_cpu_key key = { .netns = netns, .cpu = ALL_CPUS_ };
	struct listen_mib zero = {}, now;
	__u64 *off, i;

	if (bpf_map_update_elem(&listen_base_cpus, &key, &zero, BPF_NOEXIST))
		return;
	/* The counter stays in a register (the verifier tracks its value there, and tells the
	 * iterations apart by it); the key on the stack is a copy. */
	for (i = 0; i < nr_cpus && i < MAX_CPUS; i++) {
		key.cpu = i;
		off = bpf_map_lookup_elem(&cpu_offsets, &key.cpu);
		if (!off || !*off)
			continue;
		read_mib(mib, *off - 1, &now);
		bpf_map_update_elem(&listen_base_cpus, &key, &now, BPF_NOEXIST);
	}
}

static __always_inline void take_baseline(struct linux_mib *mib, __u64 netns, bool bounded)
{
	if (bounded)
		take_baseline_bounded(mib, netns);
	else
		take_baseline_loop(mib, netns);
}

/* This CPU's baseline of the namespace, or NULL once one has been taken now (nothing grew
 * since, so there is nothing to attribute). */
static __always_inline struct listen_mib *baseline(struct linux_mib *mib, __u64 netns,
						   bool bounded)
{
	struct listen_cpu_key key = { .netns = netns, .cpu = ALL_CPUS_ };
	struct listen_mib *base;

	if (!bounded) {
		base = bpf_map_lookup_elem(&listen_base, &netns);
		if (!base)
			take_baseline_loop(mib, netns);
		return base;
	}
	if (!bpf_map_lookup_elem(&listen_base_cpus, &key)) {
		take_baseline_bounded(mib, netns);
		return NULL;
	}
	key.cpu = bpf_get_smp_processor_id();
	base = bpf_map_lookup_elem(&listen_base_cpus, &key);
	if (!base)
		take_own_baseline(mib, netns);
	return base;
}

static __always_inline void attribute_listen(const struct net *net, __u16 port, bool bounded)
{
	struct linux_mib *mib = BPF_CORE_READ(net, mib.net_statistics);
	__u64 netns = netns_key(net);
	struct listen_key key = { .netns = netns, .port = port };
	struct listen_mib *base, now;
	struct listen_stats *s;
	struct listen_owner *owner;
	__u64 overflows, drops, off;

	if (!mib)
		return;
	base = baseline(mib, netns, bounded);
	if (!base)
		return;
	if (!cpu_offset(0, true, &off))
		return;
	read_mib(mib, off, &now);
	overflows = now.overflows - base->overflows;
	drops = now.drops - base->drops;
	if (!overflows && !drops)
		return;
	*base = now;
	s = bpf_map_lookup_elem(&listen_stats, &key);
	if (!s) {
		struct listen_stats fresh = {};

		owner = bpf_map_lookup_elem(&listen_owners, &key);
		fresh.tgid = owner ? owner->tgid : 0;
		bpf_map_update_elem(&listen_stats, &key, &fresh, BPF_NOEXIST);
		s = bpf_map_lookup_elem(&listen_stats, &key);
		if (!s)
			return;
	}
	__sync_fetch_and_add(&s->overflows, overflows);
	__sync_fetch_and_add(&s->drops, drops);
}

/* A SYN a listener handled, whether it queued it or dropped it (the drop is not a kfree_skb:
 * tcp_rcv_state_process consumes every SYN). One compare for every other consumed skb.
 * `located`: `location` is the tracepoint's. Without it (before 6.3) the skb tells: a received
 * (skb_iif set: not a transmitted SYN's clone) SYN without ACK is consumed only there; a SYN
 * that reaches another socket state is dropped (kfree_skb), not consumed. */
static __always_inline int handle_consume(const struct sk_buff *skb, __u64 location,
					  bool located, bool bounded)
{
	struct dst_entry *dst;
	struct net_device *dev;
	struct tcphdr th;
	unsigned char *head;

	if (!tcp_rcv_state_process_end)
		return 0; /* not in kallsyms: drops are attributed at the next handshake ACK */
	/* The tracepoint's location is the return address of the consume_skb() call. */
	if (located &&
	    (location < tcp_rcv_state_process_start || location >= tcp_rcv_state_process_end))
		return 0;
	/* The socket is not on the skb; its namespace is the input route's device's. */
	dst = (struct dst_entry *)(BPF_CORE_READ(skb, _skb_refdst) & ~1UL);
	dev = BPF_CORE_READ(dst, dev);
	head = BPF_CORE_READ(skb, head);
	if (!dev || bpf_probe_read_kernel(&th, sizeof(th),
					  head + BPF_CORE_READ(skb, transport_header)))
		return 0;
	if (!located && (!th.syn || th.ack || !BPF_CORE_READ(skb, skb_iif)))
		return 0;
	attribute_listen(BPF_CORE_READ(dev, nd_net.net), bpf_ntohs(th.dest), bounded);
	return 0;
}

/* consume_skb's location argument came in 6.3. The verifier refuses a read past a tracepoint's
 * arguments, so older kernels must not read it: the relocated constant makes that path dead,
 * and the verifier does not check dead paths. */
static __always_inline int consume_btf(__u64 *ctx, bool bounded)
{
	const struct sk_buff *skb = (const struct sk_buff *)ctx[0];

	if (bpf_core_field_exists(((struct trace_event_raw_consume_skb *)0)->location))
		return handle_consume(skb, ctx[1], true, bounded);
	return handle_consume(skb, 0, false, bounded);
}

static __always_inline int consume_tp(struct trace_event_raw_consume_skb *ctx, bool bounded)
{
	const struct sk_buff *skb = (const struct sk_buff *)ctx->skbaddr;

	if (bpf_core_field_exists(ctx->location))
		return handle_consume(skb, (__u64)ctx->location, true, bounded);
	return handle_consume(skb, 0, false, bounded);
}

SEC("tp_btf/consume_skb")
int consume_skb_btf(__u64 *ctx)
{
	return consume_btf(ctx, false);
}

SEC("tp/skb/consume_skb")
int consume_skb_tp(struct trace_event_raw_consume_skb *ctx)
{
	return consume_tp(ctx, false);
}

SEC("tp_btf/consume_skb")
int consume_skb_btf_bounded(__u64 *ctx)
{
	return consume_btf(ctx, true);
}

SEC("tp/skb/consume_skb")
int consume_skb_tp_bounded(struct trace_event_raw_consume_skb *ctx)
{
	return consume_tp(ctx, true);
}

/* A packet a listener dropped (the handshake's last ACK when the accept queue is full, and
 * ListenDrops' other causes). */
static __always_inline int handle_drop(const struct sock *sk, bool bounded)
{
	if (!sk || BPF_CORE_READ(sk, __sk_common.skc_state) != TCP_LISTEN_ ||
	    BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	attribute_listen(BPF_CORE_READ(sk, __sk_common.skc_net.net),
			 BPF_CORE_READ(sk, __sk_common.skc_num), bounded);
	return 0;
}

/* Every dropped packet passes here: two loads for a packet no listener dropped. */
/* rx_sk came in 6.12: before it the tracepoint has three arguments and the fourth is not read
 * (as at consume_skb_btf); a listener's drop is then attributed at its next SYN. */
static __always_inline int kfree_btf(__u64 *ctx, bool bounded)
{
	if (!bpf_core_field_exists(((struct trace_event_raw_kfree_skb *)0)->rx_sk))
		return 0;
	return handle_drop((const struct sock *)ctx[3], bounded);
}

static __always_inline int kfree_tp(struct trace_event_raw_kfree_skb *ctx, bool bounded)
{
	/* rx_sk came in 6.12; before it a listener's drop is attributed at its next SYN. */
	if (!bpf_core_field_exists(ctx->rx_sk))
		return 0;
	return handle_drop((const struct sock *)BPF_CORE_READ(ctx, rx_sk), bounded);
}

SEC("tp_btf/kfree_skb")
int kfree_skb_btf(__u64 *ctx)
{
	return kfree_btf(ctx, false);
}

SEC("tp/skb/kfree_skb")
int kfree_skb_tp(struct trace_event_raw_kfree_skb *ctx)
{
	return kfree_tp(ctx, false);
}

SEC("tp_btf/kfree_skb")
int kfree_skb_btf_bounded(__u64 *ctx)
{
	return kfree_btf(ctx, true);
}

SEC("tp/skb/kfree_skb")
int kfree_skb_tp_bounded(struct trace_event_raw_kfree_skb *ctx)
{
	return kfree_tp(ctx, true);
}

/* listen(): remember the owner, and read the namespace's counters if they are new to us. */
static __always_inline int handle_state(const struct sock *sk, int newstate, bool bounded)
{
	const struct net *net;
	struct listen_key key = {};
	struct listen_owner owner;

	if (newstate != TCP_LISTEN_ || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	net = BPF_CORE_READ(sk, __sk_common.skc_net.net);
	key.netns = netns_key(net);
	key.port = BPF_CORE_READ(sk, __sk_common.skc_num);
	owner.tgid = bpf_get_current_pid_tgid() >> 32;
	bpf_map_update_elem(&listen_owners, &key, &owner, BPF_ANY);
	take_baseline(BPF_CORE_READ(net, mib.net_statistics), key.netns, bounded);
	return 0;
}

/* Every TCP state change; work only for a change to LISTEN. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(listen_state_btf, const struct sock *sk, const int oldstate, const int newstate)
{
	return handle_state(sk, newstate, false);
}

SEC("tp/sock/inet_sock_set_state")
int listen_state_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	return handle_state((const struct sock *)ctx->skaddr, ctx->newstate, false);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(listen_state_btf_bounded, const struct sock *sk, const int oldstate,
	     const int newstate)
{
	return handle_state(sk, newstate, true);
}

SEC("tp/sock/inet_sock_set_state")
int listen_state_tp_bounded(struct trace_event_raw_inet_sock_set_state *ctx)
{
	return handle_state((const struct sock *)ctx->skaddr, ctx->newstate, true);
}

/* --- OOM kills ---------------------------------------------------------------------------- */

/* OOM kills are rare: a record each, in a small ring of their own. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 16);
} oom_events SEC(".maps");

struct kernfs_node___pre615 {
	struct kernfs_node *parent;
} __attribute__((preserve_access_index));

static __always_inline struct kernfs_node *kn_parent(struct kernfs_node *kn)
{
	/* Renamed to __parent in 6.15 (633488947ef6) when it became RCU-protected. */
	if (bpf_core_field_exists(kn->__parent))
		return BPF_CORE_READ(kn, __parent);
	return BPF_CORE_READ((struct kernfs_node___pre615 *)kn, parent);
}

static __always_inline bool at_limit(struct page_counter *pc)
{
	__u64 usage = BPF_CORE_READ(pc, usage.counter);
	__u64 max = BPF_CORE_READ(pc, max);

	return max < PAGE_COUNTER_MAX_ && usage + OOM_SLACK_PAGES >= max;
}

/* The memory cgroup that ran out: the OOM killer runs in the allocating task, so it is the
 * nearest cgroup at its limit from that task's up. NULL for a machine-wide OOM. */
static __always_inline struct mem_cgroup *oom_memcg(void)
{
	/* Read field by field: rare, and bpf_get_current_task_btf came in 5.11. */
	struct task_struct *cur = (struct task_struct *)bpf_get_current_task();
	int id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	struct cgroup_subsys_state *css;
	struct mem_cgroup *memcg;
	int i;

	if (id < 0 || id >= CGROUP_SUBSYS_COUNT)
		return NULL;
	css = BPF_CORE_READ(cur, cgroups, subsys[id]);
	for (i = 0; i < OOM_PATH_DEPTH; i++) {
		if (!css)
			return NULL;
		memcg = (struct mem_cgroup *)css; /* css is its first member */
		if (at_limit(&memcg->memory))
			return memcg;
		if (bpf_core_field_exists(memcg->memsw) && at_limit(&memcg->memsw))
			return memcg;
		css = BPF_CORE_READ(css, parent);
	}
	return NULL;
}

static __always_inline int handle_oom(__u32 victim_pid, __u32 victim_tgid, const char *comm,
				      bool comm_is_user)
{
	struct oom_event *e = bpf_ringbuf_reserve(&oom_events, sizeof(*e), 0);
	struct mem_cgroup *memcg;
	struct kernfs_node *kn;
	int i;

	if (!e) {
		count_drop();
		return 0;
	}
	e->kind = OOM_EVENT;
	e->victim_pid = victim_pid;
	e->victim_tgid = victim_tgid;
	e->trigger_tgid = bpf_get_current_pid_tgid() >> 32;
	e->timestamp_ns = bpf_ktime_get_ns();
	e->cgroup_id = 0;
	e->depth = 0;
	e->_pad = 0;
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), comm);
	__builtin_memset(e->path, 0, sizeof(e->path));
	memcg = oom_memcg();
	if (memcg) {
		kn = BPF_CORE_READ(memcg, css.cgroup, kn);
		e->cgroup_id = BPF_CORE_READ(kn, id);
		for (i = 0; i < OOM_PATH_DEPTH; i++) {
			struct kernfs_node *parent = kn ? kn_parent(kn) : NULL;

			if (!parent) /* the hierarchy's root has no name of its own */
				break;
			bpf_probe_read_kernel_str(e->path[i], OOM_NAME_LEN, BPF_CORE_READ(kn, name));
			e->depth = i + 1;
			kn = parent;
		}
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* The OOM killer marks its victim (a whole process is killed; this is its chosen thread). */
SEC("tp_btf/mark_victim")
int BPF_PROG(mark_victim_btf, struct task_struct *tsk)
{
	return handle_oom(tsk->pid, tsk->tgid, tsk->comm, false);
}

SEC("tp/oom/mark_victim")
int mark_victim_tp(struct trace_event_raw_mark_victim *ctx)
{
	/* Only the thread id here; a victim is normally its process's leader. */
	__u32 loc = ctx->__data_loc_comm;

	return handle_oom(ctx->pid, ctx->pid, (const char *)ctx + (loc & 0xffff), false);
}
