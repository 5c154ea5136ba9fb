/* Records of the process family, shared by process.bpf.c and checked against
 * src/probewire/probes/process.py (structs) and src/probewire/security/kernel.py (enums)
 * through the object's BTF. */
#pragma once

enum process_kind {
	PROCESS_EXEC = 1,
	PROCESS_EXIT = 2,
	PROCESS_FORK = 3, /* a new process (not a thread); only while security is on */
	PROCESS_CONNECT = 4, /* a TCP connect to a watched port or address (security) */
};

/* Evidence the exec hook found (process_event.sec_flags). */
enum process_sec_flag {
	SEC_CHECKED = 1 << 0, /* the security checks ran for this exec */
	SEC_STDIN_TCP = 1 << 1, /* fd 0 is a TCP socket */
	SEC_STDOUT_TCP = 1 << 2, /* fd 1 is a TCP socket */
	SEC_EXE_MEMFD = 1 << 3, /* the image is a memfd (memfd_create) */
	SEC_EXE_DELETED = 1 << 4, /* the image has no link left in any directory */
	SEC_IN_CONTAINER = 1 << 5, /* the process is in a non-initial PID namespace */
	SEC_EXE_TRUNCATED = 1 << 6, /* the path was too deep or long for the walk */
	SEC_KILLED = 1 << 7, /* a kill rule matched and SIGKILL was sent */
	SEC_KILL_FAILED = 1 << 8, /* a kill rule matched but bpf_send_signal refused */
};

enum process_sizes {
	PROCESS_FILENAME_LEN = 128,
	PROCESS_ARGS_LEN = 256,
	PROCESS_EXE_LEN = 256,
	SEC_MAX_CLAUSES = 64, /* one bit each in a __u64 */
	SEC_MAX_DEPTH = 8, /* generations the exec hook looks up for a listening ancestor */
	SEC_NAME_LEN = 16, /* TASK_COMM_LEN: names are compared on their first 15 bytes */
	SEC_DEPTH_SLOTS = 16, /* listener_within: a power of two > SEC_MAX_DEPTH, for masking */
};

/* One fixed-size record for every kind, so user space decodes a drained span of the ring
 * as one numpy array (the kind tag comes first, as in every ring record). */
struct process_event {
	__u32 kind; /* enum process_kind */
	__u32 pid; /* tgid */
	__u32 ppid;
	__u32 uid; /* real uid */
	__u64 timestamp_ns; /* CLOCK_MONOTONIC */
	__u64 cgroup_id;
	__u64 lifetime_ns; /* exit only */
	__s32 exit_code; /* exit only: the status byte, or -1 if killed */
	__u32 exit_signal; /* exit only: the signal that killed it, 0 if none */
	__u32 args_len; /* bytes of args used; argv strings are NUL-separated */
	__u32 euid; /* effective uid */
	char comm[16];
	char filename[PROCESS_FILENAME_LEN]; /* exec: the path given to execve */
	char args[PROCESS_ARGS_LEN];
	__u64 start_ns; /* the process's start (boot clock): with pid, names one process */
	__u64 clauses; /* exec: rule clauses whose kernel criteria all hold */
	__u32 sec_flags; /* exec: enum process_sec_flag */
	__u16 dport; /* connect: destination port */
	__u8 family; /* connect: AF_INET or AF_INET6 */
	__u8 listener_depth; /* exec: generations up to the nearest listening ancestor, 0: none */
	__u8 daddr[16]; /* connect: destination address (IPv4 in the first 4 bytes) */
	char exe[PROCESS_EXE_LEN]; /* exec: the image's path, resolved by the kernel */
};

/* Rules compiled for the exec hook (src/probewire/security/kernel.py). A rule's match becomes
 * one clause (one bit) per alternative; need_<criterion> holds the clauses that use a
 * criterion, and an exec keeps a clause's bit only if every criterion it needs holds. */
struct security_config {
	__u64 clauses; /* every configured clause */
	__u64 need_name; /* exe_basename: security_names */
	__u64 need_prefix; /* exe_dir: security_prefixes */
	__u64 need_fileless;
	__u64 need_stdio_tcp;
	__u64 need_uid; /* security_uids */
	__u64 need_container;
	__u64 need_host;
	__u64 need_listener;
	__u64 listener_within[SEC_DEPTH_SLOTS]; /* [d]: clauses that look at least d up */
	__u64 kill; /* clauses of rules whose action is kill */
	__u64 gated; /* clauses with at least one kernel criterion: an exec that keeps one of
		      * them is a candidate, and its record says how far up a listener is */
	__u32 listener_depth; /* generations the hook walks: the largest any clause needs */
	__u32 watch_connects; /* 1: some rule watches outbound connections */
};

/* security_prefixes (LPM trie): a directory prefix ending in '/' -> clause bits. */
struct security_prefix_key {
	__u32 prefixlen; /* bits */
	char path[PROCESS_EXE_LEN];
};

/* security_watched_addrs (LPM trie): family byte then address bytes. */
struct security_addr_key {
	__u32 prefixlen; /* bits, the family byte's 8 included */
	__u8 family;
	__u8 addr[16];
	__u8 _pad[3];
};

/* security_listeners: a process that called listen(), or a child forked from one (it holds
 * the inherited socket until it execs). */
struct security_listener {
	__u32 sockets; /* listening sockets it opened and has not closed */
	__u32 inherited; /* 1: forked from a listener, until its next exec */
};
