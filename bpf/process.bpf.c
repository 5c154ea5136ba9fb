// SPDX-License-Identifier: GPL-2.0
/* process family: one ring record per exec and per process exit. */
#include "common.h"
#include "process.h"

char LICENSE[] SEC("license") = "GPL";

/* Keeps the record type in the object's BTF, where the Python dtype is checked against it. */
struct process_event *btf_export_process_event __attribute__((unused));

static __always_inline void fill_common(struct process_event *e, struct task_struct *task,
					__u32 kind)
{
	e->kind = kind;
	if (KFUNCS) {
		struct task_struct *t = CAST(struct task_struct, task);

		e->pid = t->tgid;
		e->ppid = t->real_parent->tgid;
		e->uid = t->real_cred->uid.val;
	} else {
		e->pid = BPF_CORE_READ(task, tgid);
		e->ppid = BPF_CORE_READ(task, real_parent, tgid);
		e->uid = BPF_CORE_READ(task, real_cred, uid.val);
	}
	e->timestamp_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

/* Runs in the new image's context after exec succeeded: argv is on the new stack. */
static __always_inline int handle_exec(struct task_struct *task, const char *filename,
				       bool filename_is_user)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct process_event *e;
	unsigned long arg_start, arg_end;
	__u64 len;

	if (!is_traced_task(id >> 32, 0, 0))
		return 0;
	e = RESERVE_OR_DROP(struct process_event);
	if (!e)
		return 0;
	fill_common(e, task, PROCESS_EXEC);
	e->lifetime_ns = 0;
	e->exit_code = 0;
	e->exit_signal = 0;
	e->_pad = 0;
	bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), filename);
	if (KFUNCS) {
		struct mm_struct *mm = CAST(struct task_struct, task)->mm;

		arg_start = mm->arg_start;
		arg_end = mm->arg_end;
	} else {
		arg_start = BPF_CORE_READ(task, mm, arg_start);
		arg_end = BPF_CORE_READ(task, mm, arg_end);
	}
	len = arg_end - arg_start;
	if (len > PROCESS_ARGS_LEN)
		len = PROCESS_ARGS_LEN;
	e->args_len = 0;
	if (len && bpf_probe_read_user(e->args, len & (PROCESS_ARGS_LEN - 1 | PROCESS_ARGS_LEN),
				       (void *)arg_start) == 0)
		e->args_len = len;
	bpf_ringbuf_submit(e, wakeup_flags(&events, sizeof(*e), true));
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(process_exec_btf, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	return handle_exec(p, BPF_CORE_READ(bprm, filename), false);
}

SEC("tp/sched/sched_process_exec")
int process_exec_tp(struct trace_event_raw_sched_process_exec *ctx)
{
	unsigned int loc = ctx->__data_loc_filename & 0xFFFF;

	return handle_exec((struct task_struct *)bpf_get_current_task(), (const char *)ctx + loc,
			   false);
}

/* Fires for every exiting thread; only the thread-group leader's exit ends a process. */
static __always_inline int handle_exit(struct task_struct *task)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct process_event *e;
	int code;

	if ((__u32)id != (__u32)(id >> 32))
		return 0;
	if (!is_traced_task(id >> 32, 0, 0))
		return 0;
	e = RESERVE_OR_DROP(struct process_event);
	if (!e)
		return 0;
	fill_common(e, task, PROCESS_EXIT);
	e->lifetime_ns = e->timestamp_ns - KREAD(struct task_struct, task, start_time);
	code = KREAD(struct task_struct, task, exit_code);
	e->exit_signal = code & 0x7f;
	e->exit_code = e->exit_signal ? -1 : (code >> 8) & 0xff;
	e->args_len = 0;
	e->_pad = 0;
	e->filename[0] = 0;
	e->args[0] = 0;
	bpf_ringbuf_submit(e, wakeup_flags(&events, sizeof(*e), true));
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(process_exit_btf, struct task_struct *p)
{
	return handle_exit(p);
}

SEC("tp/sched/sched_process_exit")
int process_exit_tp(void *ctx)
{
	return handle_exit((struct task_struct *)bpf_get_current_task());
}
