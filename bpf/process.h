/* Records of the process family, shared by process.bpf.c and checked against
 * src/probewire/probes/process.py through the object's BTF. */
#pragma once

#define PROCESS_EXEC 1
#define PROCESS_EXIT 2

#define PROCESS_FILENAME_LEN 128
#define PROCESS_ARGS_LEN 128

/* One fixed-size record for both kinds, so user space decodes a drained span of the ring
 * as one numpy array (the kind tag comes first, as in every ring record). */
struct process_event {
	__u32 kind;
	__u32 pid; /* tgid */
	__u32 ppid;
	__u32 uid;
	__u64 timestamp_ns; /* CLOCK_MONOTONIC */
	__u64 cgroup_id;
	__u64 lifetime_ns; /* exit only */
	__s32 exit_code; /* exit only: the status byte, or -1 if killed */
	__u32 exit_signal; /* exit only: the signal that killed it, 0 if none */
	__u32 args_len; /* bytes of args used; argv strings are NUL-separated */
	__u32 _pad;
	char comm[TASK_COMM_LEN];
	char filename[PROCESS_FILENAME_LEN];
	char args[PROCESS_ARGS_LEN];
};
