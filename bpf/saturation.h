/* Keys, values and records of the saturation family, shared by saturation.bpf.c and checked
 * against src/probewire/probes/saturation.py through the object's BTF. */
#pragma once

/* Owner key of kernel threads (writeback, jbd2, kworkers): they fold into service "kernel". */
#define SAT_KERNEL_TGID 0

/* Block operations (the `operation` label). */
#define BLOCK_OP_READ 0
#define BLOCK_OP_WRITE 1
#define BLOCK_OP_FLUSH 2
#define BLOCK_OP_DISCARD 3
#define BLOCK_OP_OTHER 4

#define OOM_PATH_DEPTH 8
#define OOM_NAME_LEN 72
#define OOM_EVENT 1

/* Per process (tgid), per CPU; user space folds tgid into a service at scrape. */
struct sched_stats {
	__u64 cpu_ns; /* on-CPU time, from the kernel's own se.sum_exec_runtime */
	__u64 runq_ns; /* runnable but waiting for a CPU */
	__u64 runq_waits;
	__u64 io_ns; /* off-CPU in uninterruptible sleep waiting for I/O (in_iowait) */
	__u64 blocked_ns; /* off-CPU in other uninterruptible sleep (locks, page faults) */
	__u64 runq_us_slots[LOG2_SLOTS]; /* run-queue waits, log2 of microseconds */
};

/* Per thread (task storage, or an LRU hash by thread id where tp_btf is missing). A finished
 * wait is kept here until the thread next leaves the CPU: there its process is known in every
 * hook type (the plain tracepoints name only the thread that is switched in), so the hot path
 * touches its process's stats once per switch, not once per wait. */
struct sched_task {
	__u64 queued_ns; /* runnable and waiting since; 0 when not queued */
	__u64 slept_ns; /* in uninterruptible sleep since; 0 otherwise */
	__u64 last_sum_exec_ns; /* se.sum_exec_runtime when last added to its process */
	__u64 pending_runq_ns;
	__u64 pending_io_ns;
	__u64 pending_blocked_ns;
	__u8 pending_runq; /* pending_runq_ns holds a wait (which may be 0 ns) */
	__u8 slept_io; /* the sleep is an I/O wait */
	__u8 has_sum; /* last_sum_exec_ns is a baseline (the thread was seen since its start) */
	__u8 _pad[5];
};

/* A request between issue and completion. */
struct block_req_key {
	__u64 id; /* the struct request address (tp_btf) or its start sector (tp) */
	__u32 dev; /* kernel dev_t of the disk: major << 20 | minor */
	__u8 op; /* with a sector as id, a flush and fsync's empty write both start at 0 */
	__u8 _pad[3];
};

struct block_req {
	__u64 issue_ns;
	__u32 tgid; /* issuing process; SAT_KERNEL_TGID for kernel threads */
	__u32 bytes;
	__u8 op;
	__u8 _pad[7];
};

struct block_key {
	__u32 tgid;
	__u32 dev;
	__u8 op;
	__u8 _pad[7];
};

struct block_stats {
	__u64 ios; /* completed requests */
	__u64 bytes;
	__u64 ns_sum; /* issue -> completion */
	__u64 us_slots[LOG2_SLOTS];
};

/* The kernel's per-network-namespace ListenOverflows/ListenDrops, attributed to a listener. */
struct listen_key {
	__u64 netns; /* the network namespace's cookie (never reused, unlike its inode number) */
	__u16 port; /* local (listening) port */
	__u8 _pad[6];
};

struct listen_owner {
	__u32 tgid; /* the process that called listen() */
};

struct listen_stats {
	__u64 overflows; /* LINUX_MIB_LISTENOVERFLOWS: accept queue full */
	__u64 drops; /* LINUX_MIB_LISTENDROPS: every SYN or handshake ACK a listener dropped */
	__u32 tgid;
	__u32 _pad;
};

/* This CPU's reading of the namespace's counters at the last attribution. */
struct listen_mib {
	__u64 overflows;
	__u64 drops;
};

struct oom_event {
	__u32 kind; /* OOM_EVENT */
	__u32 victim_pid; /* thread id the kernel marked */
	__u32 victim_tgid;
	__u32 trigger_tgid; /* the process whose allocation ran out of memory */
	__u64 timestamp_ns;
	__u64 cgroup_id; /* kernfs id of the memory cgroup that hit its limit; 0: the whole machine */
	__u32 depth; /* path components below the hierarchy root that were read */
	__u32 _pad;
	char comm[TASK_COMM_LEN];
	char path[OOM_PATH_DEPTH][OOM_NAME_LEN]; /* that cgroup's path, leaf first */
};
