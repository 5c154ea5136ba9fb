// SPDX-License-Identifier: GPL-2.0
/* process family: one ring record per exec and per process exit; with security on, also one
 * per fork (the process tree) and per connect to a watched destination, and the cheap part of
 * the security rules decided at exec (src/probewire/security/). */
#include "common.h"
#include <bpf/bpf_endian.h>
#include "process.h"

char LICENSE[] SEC("license") = "GPL";

/* Keep the record type and the enums in the object's BTF, where Python checks its copies. */
struct process_event *btf_export_process_event __attribute__((unused));
struct security_config *btf_export_security_config __attribute__((unused));
struct security_prefix_key *btf_export_prefix_key __attribute__((unused));
struct security_addr_key *btf_export_addr_key __attribute__((unused));
struct security_listener *btf_export_listener __attribute__((unused));
enum process_kind btf_export_kind __attribute__((unused));
enum process_sec_flag btf_export_sec_flag __attribute__((unused));
enum process_sizes btf_export_sizes __attribute__((unused));

/* Load-time setting: 0 leaves exec/exit records as they were and makes every security branch
 * dead code the verifier drops (the fork and socket programs then return at once). */
const volatile __u8 security_on = 0;

#define SIGKILL 9
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define IPPROTO_TCP_ 6
#define TCP_SYN_SENT_ 2
#define TCP_CLOSE_ 7
#define TCP_LISTEN_ 10
/* Components of a path the walk follows; a deeper path is flagged SEC_EXE_TRUNCATED. */
#define PATH_COMPONENTS 24
/* The walk writes right to left in a buffer of this size (a power of two, so masking keeps
 * every offset in bounds for the verifier); the record keeps its first PROCESS_EXE_LEN. */
#define PATH_BUF 512

/* Run-time settings: the agent compiles the rules into these at start-up. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct security_config);
} security_config SEC(".maps");

/* Basename (first 15 bytes, NUL padded) -> clauses whose exe_basename lists it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, char[SEC_NAME_LEN]);
	__type(value, __u64);
} security_names SEC(".maps");

/* Directory prefix -> clauses whose exe_dir lists it or a shorter prefix of it: one lookup
 * finds every clause a path satisfies. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct security_prefix_key);
	__type(value, __u64);
} security_prefixes SEC(".maps");

/* Effective uid -> clauses whose uid lists it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u64);
} security_uids SEC(".maps");

/* probewire_security_kills_total: SIGKILLs sent, per clause. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SEC_MAX_CLAUSES);
	__type(key, __u32);
	__type(value, __u64);
} security_kills SEC(".maps");

/* tgid -> listening sockets: "is this process a network server?" at exec. LRU: an entry
 * whose exit was missed cannot fill it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct security_listener);
} security_listeners SEC(".maps");

/* Listening socket (its inode number) -> the tgid it was counted for, so a close in any
 * process that holds it uncounts the right one. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u32);
} security_listen_socks SEC(".maps");

/* Destination ports (host order) and addresses whose connects are sent to user space. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} security_watched_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct security_addr_key);
	__type(value, __u8);
} security_watched_addrs SEC(".maps");

/* Per-CPU working memory of the exec hook (too big for the 512-byte BPF stack). */
struct exec_scratch {
	char buf[PATH_BUF * 2];
	struct security_prefix_key key;
	char name[SEC_NAME_LEN];
	/* resolve_path's results */
	__u32 path_off; /* the path starts here in buf */
	__u32 base_off; /* ...and its last component here */
	__u32 path_flags; /* SEC_EXE_TRUNCATED */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct exec_scratch);
} exec_scratch SEC(".maps");

static __always_inline void fill_common(struct process_event *e, struct task_struct *task,
					__u32 kind)
{
	e->kind = kind;
	if (KFUNCS) {
		struct task_struct *t = CAST(struct task_struct, task);

		e->pid = t->tgid;
		e->ppid = t->real_parent->tgid;
		e->uid = t->real_cred->uid.val;
		e->euid = t->real_cred->euid.val;
		e->start_ns = t->start_boottime;
	} else {
		e->pid = BPF_CORE_READ(task, tgid);
		e->ppid = BPF_CORE_READ(task, real_parent, tgid);
		e->uid = BPF_CORE_READ(task, real_cred, uid.val);
		e->euid = BPF_CORE_READ(task, real_cred, euid.val);
		e->start_ns = BPF_CORE_READ(task, start_boottime);
	}
	e->timestamp_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	/* Every kind's other fields empty; each handler fills its own. */
	e->lifetime_ns = 0;
	e->exit_code = 0;
	e->exit_signal = 0;
	e->args_len = 0;
	e->filename[0] = 0;
	e->args[0] = 0;
	e->clauses = 0;
	e->sec_flags = 0;
	e->dport = 0;
	e->family = 0;
	e->listener_depth = 0;
	e->exe[0] = 0;
}

/* --- security at exec ------------------------------------------------------------------- */

struct exec_checks {
	__u64 clauses;
	__u32 flags;
	__u32 path_off; /* the resolved path starts here in the scratch buffer */
	__u8 listener_depth;
};

/* Prepend one path component (and its '/') to the path that starts at sc->path_off. */
static __always_inline bool prepend_name(struct exec_scratch *sc, const __u8 *name, __u32 len,
					 bool slash)
{
	__u32 off = sc->path_off;

	if (len == 0 || len >= PATH_BUF / 2 || len + (slash ? 1 : 0) > off)
		return false;
	off -= len;
	bpf_probe_read_kernel(&sc->buf[off & (PATH_BUF - 1)], len & (PATH_BUF / 2 - 1), name);
	if (slash) {
		off -= 1;
		sc->buf[off & (PATH_BUF - 1)] = '/';
	}
	sc->path_off = off;
	return true;
}

/* The path of (dentry, vfsmount) as the task sees it (relative to its root, as d_path
 * gives it), written right to left to end at PATH_BUF - 1; results in sc->path_off,
 * base_off and path_flags. The verifier allows bpf_d_path only in a few LSM/fentry hooks,
 * hence the walk: up through d_parent, across mounts through mnt_mountpoint, bounded by
 * PATH_COMPONENTS. A global function, so the verifier checks it once on its own instead of
 * once per path through the exec hook; the offset lives in the scratch map, not a register,
 * so the verifier does not track a different range of it on every iteration. */
__noinline int resolve_path(__u64 dentry_p, __u64 vfsmnt_p, __u64 root_p, __u64 root_mnt_p)
{
	struct dentry *dentry = (struct dentry *)dentry_p;
	/* struct mount wraps the vfsmount; CO-RE relocates the offset. */
	struct mount *mnt = (void *)vfsmnt_p - bpf_core_field_offset(struct mount, mnt);
	__u32 zero = 0;
	/* The caller's per-CPU scratch, looked up again: a global function taking a pointer
	 * needs Linux 5.12, scalars only 5.6. */
	struct exec_scratch *sc = bpf_map_lookup_elem(&exec_scratch, &zero);
	int i;

	if (!sc)
		return 0;
	sc->buf[PATH_BUF - 1] = 0;
	sc->path_off = PATH_BUF - 1;
	sc->base_off = PATH_BUF - 1;
	sc->path_flags = 0;
	for (i = 0; i < PATH_COMPONENTS; i++) {
		struct dentry *mnt_root = BPF_CORE_READ(mnt, mnt.mnt_root);
		struct dentry *parent = BPF_CORE_READ(dentry, d_parent);
		struct mount *up;
		struct qstr name;

		if ((__u64)dentry == root_p &&
		    (__u64)mnt + bpf_core_field_offset(struct mount, mnt) == root_mnt_p)
			goto done;
		if (dentry == mnt_root) {
			up = BPF_CORE_READ(mnt, mnt_parent);
			if (up == mnt)
				goto done; /* the root of the mount namespace */
			dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			continue;
		}
		name = BPF_CORE_READ(dentry, d_name);
		if (dentry == parent) {
			/* Disconnected, e.g. a memfd: its one name is the whole path. */
			if (prepend_name(sc, name.name, name.len, false))
				sc->base_off = sc->path_off;
			else
				sc->path_flags = SEC_EXE_TRUNCATED;
			return 0;
		}
		if (!prepend_name(sc, name.name, name.len, true)) {
			sc->path_flags = SEC_EXE_TRUNCATED;
			return 0;
		}
		if (sc->base_off == PATH_BUF - 1) /* the first name: the basename (not i == 0:
						     * a bind-mounted file starts at its mount) */
			sc->base_off = sc->path_off + 1;
		dentry = parent;
	}
	sc->path_flags = SEC_EXE_TRUNCATED;
	return 0;
done:
	if (sc->path_off == PATH_BUF - 1) { /* the root itself */
		sc->path_off = PATH_BUF - 2;
		sc->buf[PATH_BUF - 2] = '/';
	}
	return 0;
}

static __always_inline __u64 lookup_name(struct exec_scratch *sc)
{
	__u64 *bits = bpf_map_lookup_elem(&security_names, sc->name);

	return bits ? *bits : 0;
}

/* Clauses whose exe_basename lists the comm (the basename exec gave it) or the image's own
 * basename (/usr/bin/nc runs /usr/bin/nc.openbsd); names compare on their first 15 bytes. */
static __always_inline __u64 name_clauses(struct exec_scratch *sc)
{
	__u64 bits;

	__builtin_memset(sc->name, 0, sizeof(sc->name));
	bpf_get_current_comm(sc->name, sizeof(sc->name));
	bits = lookup_name(sc);
	__builtin_memset(sc->name, 0, sizeof(sc->name));
	/* Its first 15 bytes and a NUL, as a comm holds them. */
	bpf_probe_read_kernel_str(sc->name, SEC_NAME_LEN,
				  &sc->buf[sc->base_off & (PATH_BUF - 1)]);
	return bits | lookup_name(sc);
}

/* Clauses whose exe_dir holds an absolute `path` (a kernel string); one LPM lookup. */
static __always_inline __u64 prefix_clauses(struct exec_scratch *sc, const char *path)
{
	__u64 *bits;

	sc->key.prefixlen = PROCESS_EXE_LEN * 8;
	if (bpf_probe_read_kernel_str(sc->key.path, PROCESS_EXE_LEN, path) <= 1 ||
	    sc->key.path[0] != '/')
		return 0;
	bits = bpf_map_lookup_elem(&security_prefixes, &sc->key);
	return bits ? *bits : 0;
}

/* Is this fd of the task a TCP socket? Only shells (or whatever the rules name) pay this. */
static __always_inline bool fd_is_tcp(struct task_struct *task, unsigned int fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;
	struct socket *sock;
	struct sock *sk;
	__u16 family;

	if (fd >= BPF_CORE_READ(fdt, max_fds))
		return false;
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	if (!file || (BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return false;
	sock = BPF_CORE_READ(file, private_data);
	sk = BPF_CORE_READ(sock, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP_)
		return false;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	return family == AF_INET || family == AF_INET6;
}

/* Generations up to the nearest ancestor in security_listeners (pid 1 never counts: an init
 * that holds socket-activation sockets would make every process a server's child). */
__noinline int listener_depth(__u64 parent_p, __u32 max_depth)
{
	struct task_struct *p = (struct task_struct *)parent_p;
	__u32 d;

	for (d = 1; d <= SEC_MAX_DEPTH; d++) {
		struct security_listener *l;
		__u32 tgid;

		if (d > max_depth || !p)
			return 0;
		tgid = BPF_CORE_READ(p, tgid);
		if (tgid <= 1)
			return 0;
		l = bpf_map_lookup_elem(&security_listeners, &tgid);
		if (l && (l->sockets || l->inherited))
			return d;
		p = BPF_CORE_READ(p, real_parent);
	}
	return 0;
}

__noinline int count_kills(__u64 killed)
{
	int i;

	for (i = 0; i < SEC_MAX_CLAUSES; i++) {
		__u32 key = i; /* its own slot: the loop counter must stay a tracked register */
		__u64 *n;

		if (!(killed & (1ULL << i)))
			continue;
		n = bpf_map_lookup_elem(&security_kills, &key);
		if (n)
			*n += 1;
	}
	return 0;
}

/* The rules' kernel criteria, cheapest first; each is looked at only while some clause that
 * needs it still stands, so a benign exec ends after the name and path lookups. */
static __always_inline void check_exec(struct exec_checks *c, struct exec_scratch *sc,
				       struct task_struct *task, const char *filename)
{
	__u32 zero = 0;
	struct security_config *cfg = bpf_map_lookup_elem(&security_config, &zero);
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	struct dentry *dentry = BPF_CORE_READ(exe, f_path.dentry);
	__u64 cand, killed;
	char head[6] = {};
	__u32 d;

	c->flags = SEC_CHECKED;
	resolve_path((__u64)dentry, (__u64)BPF_CORE_READ(exe, f_path.mnt),
		     (__u64)BPF_CORE_READ(task, fs, root.dentry),
		     (__u64)BPF_CORE_READ(task, fs, root.mnt));
	c->flags |= sc->path_flags & SEC_EXE_TRUNCATED;
	c->path_off = sc->path_off;
	if (BPF_CORE_READ(dentry, d_inode, __i_nlink) == 0) {
		c->flags |= SEC_EXE_DELETED;
		bpf_probe_read_kernel(head, sizeof(head), BPF_CORE_READ(dentry, d_name.name));
		if (head[0] == 'm' && head[1] == 'e' && head[2] == 'm' && head[3] == 'f' &&
		    head[4] == 'd' && head[5] == ':')
			c->flags |= SEC_EXE_MEMFD;
	}
	if (BPF_CORE_READ(task, thread_pid, level) > 0)
		c->flags |= SEC_IN_CONTAINER;
	if (!cfg || !cfg->clauses)
		return;
	cand = cfg->clauses;
	if (cand & cfg->need_name)
		cand &= name_clauses(sc) | ~cfg->need_name;
	if ((cand & cfg->need_fileless) && !(c->flags & (SEC_EXE_DELETED | SEC_EXE_MEMFD)))
		cand &= ~cfg->need_fileless;
	if ((cand & cfg->need_container) && !(c->flags & SEC_IN_CONTAINER))
		cand &= ~cfg->need_container;
	if ((cand & cfg->need_host) && (c->flags & SEC_IN_CONTAINER))
		cand &= ~cfg->need_host;
	if (cand & cfg->need_prefix) {
		/* A script runs its interpreter: the script's own path is the one given. */
		__u64 bits = prefix_clauses(sc, &sc->buf[c->path_off & (PATH_BUF - 1)]) |
			     prefix_clauses(sc, filename);

		cand &= bits | ~cfg->need_prefix;
	}
	if (cand & cfg->need_uid) {
		__u32 euid = BPF_CORE_READ(task, real_cred, euid.val);
		__u64 *bits = bpf_map_lookup_elem(&security_uids, &euid);

		cand &= (bits ? *bits : 0) | ~cfg->need_uid;
	}
	if (cand & cfg->need_stdio_tcp) {
		if (fd_is_tcp(task, 0))
			c->flags |= SEC_STDIN_TCP;
		if (fd_is_tcp(task, 1))
			c->flags |= SEC_STDOUT_TCP;
		if (!(c->flags & (SEC_STDIN_TCP | SEC_STDOUT_TCP)))
			cand &= ~cfg->need_stdio_tcp;
	}
	/* The listener walk last: rules that need it, and any candidate (its alert names the
	 * network server it descends from) pay for it; a benign exec does not. */
	if (cand & (cfg->need_listener | cfg->gated)) {
		/* Read, not cast: a global function takes scalars, not the hook's trusted task. */
		d = listener_depth((__u64)BPF_CORE_READ(task, real_parent), SEC_MAX_DEPTH);
		d &= SEC_DEPTH_SLOTS - 1; /* the bound the verifier needs for the index */
		c->listener_depth = d;
		if (cand & cfg->need_listener)
			cand &= (d ? cfg->listener_within[d] : 0) | ~cfg->need_listener;
	}
	c->clauses = cand;
	killed = cand & cfg->kill;
	if (killed) {
		/* sched_process_exec runs after the new image is in place but before the task
		 * returns to user mode: the pending SIGKILL ends it before its first instruction. */
		if (bpf_send_signal(SIGKILL) == 0) {
			c->flags |= SEC_KILLED;
			count_kills(killed);
		} else {
			c->flags |= SEC_KILL_FAILED;
		}
	}
}

/* An exec ends a forked child's hold on its parent's listening sockets (the common case:
 * servers open them close-on-exec). */
static __always_inline void exec_drops_inherited(__u32 tgid)
{
	struct security_listener *l = bpf_map_lookup_elem(&security_listeners, &tgid);

	if (!l || !l->inherited)
		return;
	if (l->sockets)
		l->inherited = 0;
	else
		bpf_map_delete_elem(&security_listeners, &tgid);
}

/* Runs in the new image's context after exec succeeded: argv is on the new stack. */
static __always_inline int handle_exec(struct task_struct *task, const char *filename)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct exec_checks c = {};
	struct process_event *e;
	unsigned long arg_start, arg_end;
	__u64 len;
	__u32 zero = 0;
	struct exec_scratch *sc = NULL;

	if (!is_traced_task(id >> 32, 0, 0))
		return 0;
	if (security_on) {
		sc = bpf_map_lookup_elem(&exec_scratch, &zero);
		if (sc)
			check_exec(&c, sc, task, filename);
		exec_drops_inherited(id >> 32);
	}
	e = RESERVE_OR_DROP(struct process_event);
	if (!e)
		return 0;
	fill_common(e, task, PROCESS_EXEC);
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
	if (len && bpf_probe_read_user(e->args, len & (PROCESS_ARGS_LEN - 1 | PROCESS_ARGS_LEN),
				       (void *)arg_start) == 0)
		e->args_len = len;
	if (security_on && sc) {
		e->clauses = c.clauses;
		e->sec_flags = c.flags;
		e->listener_depth = c.listener_depth;
		bpf_probe_read_kernel_str(e->exe, sizeof(e->exe),
					  &sc->buf[c.path_off & (PATH_BUF - 1)]);
	}
	bpf_ringbuf_submit(e, wakeup_flags(&events, sizeof(*e), true));
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(process_exec_btf, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	return handle_exec(p, BPF_CORE_READ(bprm, filename));
}

SEC("tp/sched/sched_process_exec")
int process_exec_tp(struct trace_event_raw_sched_process_exec *ctx)
{
	unsigned int loc = ctx->__data_loc_filename & 0xFFFF;

	return handle_exec((struct task_struct *)bpf_get_current_task(), (const char *)ctx + loc);
}

/* Fires for every exiting thread; only the thread-group leader's exit ends a process. */
static __always_inline int handle_exit(struct task_struct *task)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	struct process_event *e;
	int code;

	if ((__u32)id != tgid)
		return 0;
	if (security_on)
		bpf_map_delete_elem(&security_listeners, &tgid);
	if (!is_traced_task(tgid, 0, 0))
		return 0;
	e = RESERVE_OR_DROP(struct process_event);
	if (!e)
		return 0;
	fill_common(e, task, PROCESS_EXIT);
	e->lifetime_ns = e->timestamp_ns - KREAD(struct task_struct, task, start_time);
	code = KREAD(struct task_struct, task, exit_code);
	e->exit_signal = code & 0x7f;
	e->exit_code = e->exit_signal ? -1 : (code >> 8) & 0xff;
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

/* --- the process tree: forks ------------------------------------------------------------ */

#define CLONE_PARENT_ 0x00008000
#define CLONE_THREAD_ 0x00010000

/* A new process (threads are skipped): the tree learns its parent before it execs, and a
 * listener's child inherits its listening sockets. Runs in the parent, before the child is
 * woken, so the record is in the ring before anything the child does. */
static __always_inline int handle_fork(__u32 child_tgid, __u32 parent_tgid, __u64 start_ns)
{
	struct task_struct *cur = (struct task_struct *)bpf_get_current_task();
	struct security_listener *l;
	struct process_event *e;

	l = bpf_map_lookup_elem(&security_listeners, &parent_tgid);
	if (l && parent_tgid > 1) {
		struct security_listener inherited = { .sockets = 0, .inherited = 1 };

		bpf_map_update_elem(&security_listeners, &child_tgid, &inherited, BPF_ANY);
	}
	if (!is_traced_task(child_tgid, 0, 0))
		return 0;
	e = RESERVE_OR_DROP(struct process_event);
	if (!e)
		return 0;
	/* The child's credentials, cgroup and comm are its parent's copies. */
	fill_common(e, cur, PROCESS_FORK);
	e->pid = child_tgid;
	e->ppid = parent_tgid;
	e->start_ns = start_ns;
	bpf_ringbuf_submit(e, wakeup_flags(&events, sizeof(*e), true));
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(process_fork_btf, struct task_struct *parent, struct task_struct *child)
{
	__u32 tgid;

	if (!security_on)
		return 0;
	tgid = child->tgid;
	if (child->pid != tgid)
		return 0; /* a thread */
	return handle_fork(tgid, child->real_parent->tgid, child->start_boottime);
}

/* The fallback is task_newtask, not tp/sched_process_fork: that one gives the child's
 * thread id only, this one the clone flags that tell a thread from a process. The child's
 * start time is not in it; the boot clock now is within a tick of it (the tree allows that). */
SEC("tp/task/task_newtask")
int process_fork_tp(struct trace_event_raw_task_newtask *ctx)
{
	struct task_struct *cur;
	__u64 flags;

	if (!security_on)
		return 0;
	flags = ctx->clone_flags;
	if (flags & CLONE_THREAD_)
		return 0;
	cur = (struct task_struct *)bpf_get_current_task();
	return handle_fork(ctx->pid,
			   (flags & CLONE_PARENT_) ? BPF_CORE_READ(cur, real_parent, tgid)
						   : BPF_CORE_READ(cur, tgid),
			   bpf_ktime_get_boot_ns());
}

/* --- listening sockets and watched connects --------------------------------------------- */

static __always_inline __u64 socket_ino(const struct sock *sk)
{
	struct socket *sock = BPF_CORE_READ(sk, sk_socket);

	if (!sock)
		return 0;
	/* struct socket is the first member of struct socket_alloc, next to its inode. */
	return BPF_CORE_READ((struct socket_alloc *)sock, vfs_inode.i_ino);
}

static __always_inline void on_listen(const struct sock *sk)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 ino = socket_ino(sk);
	struct security_listener fresh = { .sockets = 1, .inherited = 0 }, *l;

	if (!ino || tgid <= 1 || bpf_map_update_elem(&security_listen_socks, &ino, &tgid,
						    BPF_NOEXIST))
		return;
	l = bpf_map_lookup_elem(&security_listeners, &tgid);
	if (l)
		__sync_fetch_and_add(&l->sockets, 1);
	else
		bpf_map_update_elem(&security_listeners, &tgid, &fresh, BPF_NOEXIST);
}

static __always_inline void on_listen_close(const struct sock *sk)
{
	__u64 ino = socket_ino(sk);
	__u32 *owner = bpf_map_lookup_elem(&security_listen_socks, &ino);
	struct security_listener *l;
	__u32 tgid;

	if (!owner)
		return;
	tgid = *owner;
	bpf_map_delete_elem(&security_listen_socks, &ino);
	l = bpf_map_lookup_elem(&security_listeners, &tgid);
	if (!l || !l->sockets)
		return;
	/* No use of the old value: clang 14 emits that only for -mcpu=v3. */
	__sync_fetch_and_add(&l->sockets, -1);
	if (!l->sockets && !l->inherited)
		bpf_map_delete_elem(&security_listeners, &tgid);
}

static __always_inline bool watched(__u16 dport, __u16 family, const __u8 *daddr)
{
	struct security_addr_key key = {};

	if (bpf_map_lookup_elem(&security_watched_ports, &dport))
		return true;
	key.family = family;
	if (family == AF_INET) {
		key.prefixlen = 8 + 32;
		__builtin_memcpy(key.addr, daddr, 4);
	} else {
		key.prefixlen = 8 + 128;
		__builtin_memcpy(key.addr, daddr, 16);
	}
	return bpf_map_lookup_elem(&security_watched_addrs, &key) != NULL;
}

/* connect() runs in the caller's context: the record names the process that connects. */
static __always_inline void on_connect(__u16 dport, __u16 family, const __u8 *daddr)
{
	__u32 zero = 0;
	struct security_config *cfg = bpf_map_lookup_elem(&security_config, &zero);
	__u64 id = bpf_get_current_pid_tgid();
	struct process_event *e;

	if (!cfg || !cfg->watch_connects || !watched(dport, family, daddr))
		return;
	if (!is_traced_task(id >> 32, 0, dport))
		return;
	e = RESERVE_OR_DROP(struct process_event);
	if (!e)
		return;
	fill_common(e, (struct task_struct *)bpf_get_current_task(), PROCESS_CONNECT);
	e->dport = dport;
	e->family = family;
	__builtin_memcpy(e->daddr, daddr, 16);
	bpf_ringbuf_submit(e, wakeup_flags(&events, sizeof(*e), true));
}

static __always_inline int handle_state(const struct sock *sk, int oldstate, int newstate)
{
	__u8 daddr[16] = {};
	__u16 family;

	if (!security_on || KREAD(struct sock, sk, sk_protocol) != IPPROTO_TCP_)
		return 0;
	if (newstate == TCP_LISTEN_) {
		on_listen(sk);
	} else if (oldstate == TCP_LISTEN_ && newstate == TCP_CLOSE_) {
		on_listen_close(sk);
	} else if (newstate == TCP_SYN_SENT_) {
		family = KREAD(struct sock, sk, __sk_common.skc_family);
		if (family == AF_INET)
			KCOPY(daddr, 4, struct sock, sk, __sk_common.skc_daddr);
		else
			KCOPY(daddr, 16, struct sock, sk, __sk_common.skc_v6_daddr);
		on_connect(bpf_ntohs(KREAD(struct sock, sk, __sk_common.skc_dport)), family, daddr);
	}
	return 0;
}

/* Every TCP state change passes here, as in the tcp family; only listen, a listener's close
 * and a connect do any work (a connect: one lookup unless its destination is watched). */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(process_sock_btf, const struct sock *sk, const int oldstate, const int newstate)
{
	if (!security_on)
		return 0;
	return handle_state(sk, oldstate, newstate);
}

SEC("tp/sock/inet_sock_set_state")
int process_sock_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (!security_on)
		return 0;
	return handle_state((const struct sock *)ctx->skaddr, ctx->oldstate, ctx->newstate);
}
