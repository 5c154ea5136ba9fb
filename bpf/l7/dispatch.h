/* The capture layer's hooks, wired to the protocols l7.bpf.c lists in L7_PROTOCOLS(X):
 *
 *   X(ID, name, parse, close)   ID: enum l7_proto without its L7_PROTO_ prefix
 *                               name: the protocol's name; name##_classify (its proto_<name>.h)
 *                               parse: int parse(void *ctx, struct l7_event *ev), run by the
 *                                      tail-called parser program (l7_ship_data: user space)
 *                               close: bool close(struct l7_conn *, __u64 key, bool close_call),
 *                                      true when the connection's entry may go
 *
 * From the list this header makes the classifier chain (in list order), the end of a
 * connection per protocol, and two parser programs per protocol (l7_<name>_tp and
 * l7_<name>_uprobe: a tail call stays within one program type), which user space puts into the
 * dispatch PROG_ARRAYs at their protocol's id. */
#pragma once

#include "capture.h"
#include "self_conns.h"

/* ---- classification ------------------------------------------------------------------------- */

#define L7_CLASSIFY_ONE(ID, name, parse, close)                                               \
	if (!proto && (enabled_protocols & (1U << L7_PROTO_##ID))) {                          \
		role = name##_classify(pk);                                                   \
		if (role)                                                                     \
			proto = L7_PROTO_##ID;                                                \
	}

/* Is this call's first bytes the start of a known protocol's message? Tried where the talk
 * turns (and on every datagram), at most L7_MAX_TRIES times in each direction. */
static __always_inline bool l7_classify(struct l7_conn *c, struct l7_event *ev, bool turned)
{
	struct l7_peek *pk = &ev->peek;
	__u32 di = ev->dir == L7_DIR_IN ? 0 : 1, p = c->partial_len & 7;
	__u64 sz = ev->first_len;
	__u8 proto = 0, role = 0;

	if (!ev->buf)
		return false; /* sendfile: the bytes are not in memory */
	if (!turned && !p && c->tries[di] && ev->transport == L7_TCP)
		return false; /* mid-message */
	__builtin_memset(pk->data, 0, L7_PEEK);
	if (p)
		__builtin_memcpy(pk->data, c->partial, 8);
	if (sz > L7_PEEK - 8)
		sz = L7_PEEK - 8;
	barrier_var(sz);
	barrier_var(p);
	if (sz && p < 8 && sz <= L7_PEEK - 8)
		bpf_probe_read_user(pk->data + p, sz, (const void *)ev->buf);
	pk->len = p + sz;
	pk->dir = ev->dir;
	pk->transport = ev->transport;
	pk->lport = c->h.lport;
	pk->rport = c->h.rport;
	pk->call_len = ev->total + p;
	ev->partial_len = p;

	L7_PROTOCOLS(L7_CLASSIFY_ONE)

	if (proto) {
		c->h.proto = proto;
		c->h.role = role;
		c->partial_len = 0;
		coverage_add(proto, L7_COV_CLASSIFIED);
		if (role == L7_ROLE_CLIENT)
			remember_client(&c->h);
		return true;
	}
	/* A text message split before its first word ended ("GE" then "T / ..."): the short
	 * upper-case start waits for the next call. */
	if (ev->transport == L7_TCP && maybe_split_method(pk->data, p + ev->first_len)) {
		__builtin_memcpy(c->partial, pk->data, 8);
		c->partial_len = (p + ev->first_len) & 7;
		return false;
	}
	c->partial_len = 0;
	/* Counted once, at the first miss: a connection whose first bytes no classifier claims
	 * (for TLS plaintext: typically HTTP/2 opened before the agent started). */
	if (!c->tries[0] && !c->tries[1])
		coverage_add(L7_PROTO_UNKNOWN, (c->h.flags & L7_FLAG_TLS) ? L7_COV_UNCLASSIFIED_TLS :
									     L7_COV_UNCLASSIFIED);
	if (c->tries[di] < 255)
		c->tries[di] += 1;
	if ((c->tries[0] >= L7_MAX_TRIES && c->tries[1] >= L7_MAX_TRIES) ||
	    c->tries[di] >= 2 * L7_MAX_TRIES)
		c->h.proto = L7_PROTO_NONE;
	return false;
}

/* ---- the end of a connection ------------------------------------------------------------------ */

#define L7_CLOSE_ONE(ID, name, parse, close)                                                  \
	case L7_PROTO_##ID:                                                                   \
		gone = close(c, key, close_call);                                             \
		break;

/* `close_call`: the process closed it; else the socket closed under it (exit, kill, reset). */
static __always_inline void l7_end(__u64 key, bool close_call)
{
	struct l7_conn *c = bpf_map_lookup_elem(&l7_conns, &key);
	bool gone = true;

	if (!c)
		return;
	switch (c->h.proto) {
		L7_PROTOCOLS(L7_CLOSE_ONE)
	default:
		break;
	}
	if (gone)
		bpf_map_delete_elem(&l7_conns, &key);
}

static const struct l7_conn zero_conn;

/* The connection of a socket, made on first sight. The address of a freed socket is reused:
 * different ports mean a new connection (a reset socket has already given its local port back:
 * inet_put_port zeroes it); the earlier one is ended first, as if it had closed. */
static __always_inline struct l7_conn *conn_for(const struct sock *sk, __u64 key, __u32 tgid,
						 __u8 transport)
{
	struct l7_conn *c = bpf_map_lookup_elem(&l7_conns, &key);
	__u16 lport, dport_be;

	if (c) {
		lport = KREAD(struct sock, sk, __sk_common.skc_num);
		dport_be = KREAD(struct sock, sk, __sk_common.skc_dport);
		if (c->h.rport == bpf_ntohs(dport_be) && (c->h.lport == lport || lport == 0))
			return c;
		l7_end(key, false);
	}
	bpf_map_update_elem(&l7_conns, &key, &zero_conn, BPF_ANY);
	c = bpf_map_lookup_elem(&l7_conns, &key);
	if (!c)
		return NULL;
	c->h.conn_id = key;
	c->h.tgid = tgid;
	c->h.flags = ((key & TLS_KEY_BIT) ? L7_FLAG_TLS : 0) |
		     (transport == IPPROTO_UDP ? L7_FLAG_UDP : 0);
	fill_identity(&c->h, sk);
	if (!is_traced_task(tgid, c->h.lport, c->h.rport) || self_conn_peer(&c->h))
		c->h.proto = L7_PROTO_FILTERED;
	return c;
}

/* ---- parsers ------------------------------------------------------------------------------------ */

#define L7_PARSER_PROGS(ID, name, parse, close)                                               \
	SEC("tp")                                                                             \
	int l7_##name##_tp(void *ctx)                                                         \
	{                                                                                     \
		struct l7_event *ev = l7_event();                                             \
		return ev ? parse(ctx, ev) : 0;                                               \
	}                                                                                     \
	SEC("uprobe")                                                                         \
	int l7_##name##_uprobe(void *ctx)                                                     \
	{                                                                                     \
		struct l7_event *ev = l7_event();                                             \
		return ev ? parse(ctx, ev) : 0;                                               \
	}

L7_PROTOCOLS(L7_PARSER_PROGS)

/* Filled by user space with each enabled protocol's parser at its id (prog arrays take no
 * BTF: sizes only). */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, L7_PROTO_COUNT);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} l7_parsers_tp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, L7_PROTO_COUNT);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} l7_parsers_uprobe SEC(".maps");

/* One call on a socket, its event filled by the caller: find its connection, classify it if
 * need be, and hand it to its protocol's parser (a tail call: nothing returns from it). */
static __always_inline void l7_capture(void *ctx, struct l7_event *ev, const struct sock *sk,
				       void *parsers)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_conn *c = conn_for(sk, ev->key, id >> 32, ev->transport);
	__u32 proto;
	bool turned;

	if (!c || L7_STAGE <= L7_STAGE_CONN)
		return;
	proto = c->h.proto;
	if (proto >= L7_PROTO_COUNT)
		return; /* none, or filtered */
	turned = c->last_dir != ev->dir || ev->transport == L7_UDP;
	c->last_dir = ev->dir;
	ev->classified = 0;
	if (proto == L7_PROTO_UNKNOWN) {
		if (!l7_classify(c, ev, turned))
			return;
		proto = c->h.proto;
		ev->classified = 1;
	}
	/* Only what every parser needs; one that wants the whole identity copies it from its
	 * connection (l7_event_identity): a 64-byte copy a call is not free. */
	ev->h.proto = proto;
	ev->h.role = c->h.role;
	ev->h.tgid = id >> 32; /* a socket may pass to another process (fork, fd passing) */
	ev->h.tid = (__u32)id;
	bpf_tail_call(ctx, parsers, proto & (L7_PROTO_COUNT - 1));
}

/* ---- syscalls: the exit sees the bytes, its arguments are still in the saved registers ------ */

#ifdef L7_BOUNDED
/* No bpf_task_pt_regs (5.15): each data syscall's arguments (fd, buffer, count, and the 5th:
 * a datagram's peer) are parked by its enter tracepoint, per thread, for its exit. LRU: an
 * entry whose exit returned early (an error, no bytes) or never came is overwritten by the
 * thread's next call or pushed out. */
struct l7_sys_args {
	__u64 arg[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64); /* pid_tgid */
	__type(value, struct l7_sys_args);
} l7_sys_args SEC(".maps");

/* `arg5`: ctx->args[4] where the syscall has a 5th argument, else 0 (a tracepoint program
 * may not read past its event's fields: the attach fails with EACCES). */
#define L7_ENTER(name, arg5)                                                                 \
	SEC("tp/syscalls/sys_enter_" #name)                                                  \
	int l7_enter_##name(struct trace_event_raw_sys_enter *ctx)                           \
	{                                                                                    \
		__u64 id = bpf_get_current_pid_tgid();                                       \
		struct l7_sys_args a = { .arg = { ctx->args[0], ctx->args[1], ctx->args[2],  \
						  arg5 } };                                  \
                                                                                             \
		if (traced_task(id >> 32))                                                   \
			bpf_map_update_elem(&l7_sys_args, &id, &a, BPF_ANY);                 \
		return 0;                                                                    \
	}

L7_ENTER(read, 0)
L7_ENTER(recvfrom, ctx->args[4])
L7_ENTER(readv, 0)
L7_ENTER(recvmsg, 0)
L7_ENTER(recvmmsg, 0)
L7_ENTER(write, 0)
L7_ENTER(sendto, ctx->args[4])
L7_ENTER(writev, 0)
L7_ENTER(sendmsg, 0)
L7_ENTER(sendmmsg, 0)
L7_ENTER(sendfile64, 0)
#endif

/* A syscall's arguments are read back from the registers saved at entry (the kernel does not
 * change them for these calls), so no enter hook has to park them: one map update and delete
 * fewer per call. A request's start is thereby the end of its first write: the same instant
 * unless that write blocked on a full send buffer. bpf_task_pt_regs gives a BTF-typed
 * pointer, so the arguments are plain loads (the _CORE_SYSCALL macros made each a
 * bpf_probe_read_kernel call; arm64's first argument, orig_x0, still is one: libbpf's
 * PT_REGS_PARM1_SYSCALL reads it so). */
static __always_inline void exit_io(void *ctx, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct l7_event *ev = l7_event();
#ifndef L7_BOUNDED
	struct pt_regs *regs;
#endif
	struct iovec iov = {};
	struct user_msghdr msg = {};
	struct mmsghdr mm = {};
	const void *data;
	__u64 count, now;
	struct sock *sk;
	__u8 transport = 0;

	if (!ev || !traced_task(id >> 32) || L7_STAGE <= L7_STAGE_FILTER)
		return;
#ifdef L7_BOUNDED
	struct l7_sys_args *args = bpf_map_lookup_elem(&l7_sys_args, &id);
	struct l7_sys_args a;

	if (!args) {
		/* Entered before the agent attached (a thread already blocked in recv()), or its
		 * entry pushed out of the LRU map: the call's bytes are lost to the capture, and
		 * counted (the exit programs run only for calls that moved bytes). */
		coverage_add(L7_PROTO_UNKNOWN, L7_COV_NO_SYS_ENTER);
		return;
	}
	a = *args;
	bpf_map_delete_elem(&l7_sys_args, &id);
	sk = sock_of_fd(a.arg[0], &transport);
	if (!sk || L7_STAGE <= L7_STAGE_SOCK)
		return;
	if (in_tls_call(sk) || L7_STAGE <= L7_STAGE_TLS)
		return;
	data = (const void *)a.arg[1];
	count = a.arg[2];
#else
	regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	sk = sock_of_fd(PT_REGS_PARM1_SYSCALL(regs), &transport);
	if (!sk || L7_STAGE <= L7_STAGE_SOCK)
		return;
	if (in_tls_call(sk) || L7_STAGE <= L7_STAGE_TLS)
		return; /* ciphertext: the OpenSSL uprobes see this data in the clear */
	data = (const void *)PT_REGS_PARM2_SYSCALL(regs);
	count = PT_REGS_PARM3_SYSCALL(regs);
#endif
	ev->transport = transport;
	ev->peer_family = 0;
	ev->total = ret;
	ev->first_len = ret;
	ev->iovs = 0;
	ev->niov = 0;
	switch (ev->io) {
	case IO_PLAIN: /* recvfrom/sendto name a datagram's peer in their 5th argument */
#ifdef L7_BOUNDED
		if (transport == L7_UDP)
			read_peer(ev, (const void *)a.arg[3]);
#else
		if (transport == L7_UDP)
			read_peer(ev, (const void *)PT_REGS_PARM5_SYSCALL(regs));
#endif
		break;
	case IO_MSG:
		if (bpf_probe_read_user(&msg, sizeof(msg), data))
			return;
		if (transport == L7_UDP)
			read_peer(ev, msg.msg_name);
		data = msg.msg_iov;
		count = msg.msg_iovlen;
		/* fall through: its bytes are in an iovec array */
	case IO_IOV:
		ev->iovs = (__u64)data;
		ev->niov = count;
		if (bpf_probe_read_user(&iov, sizeof(iov), data))
			return;
		data = iov.iov_base;
		if (iov.iov_len < ev->first_len)
			ev->first_len = iov.iov_len;
		break;
	case IO_MMSG: /* ret is the number of datagrams; the first one is classified */
		if (bpf_probe_read_user(&mm, sizeof(mm), data) || mm.msg_hdr.msg_iovlen < 1 ||
		    bpf_probe_read_user(&iov, sizeof(iov), mm.msg_hdr.msg_iov))
			return;
		read_peer(ev, mm.msg_hdr.msg_name);
		ev->iovs = (__u64)data;
		ev->niov = ret;
		ev->total = mm.msg_len;
		ev->first_len = mm.msg_len < iov.iov_len ? mm.msg_len : iov.iov_len;
		data = iov.iov_base;
		break;
	default: /* sendfile: the bytes never pass through user memory */
		data = NULL;
		break;
	}
	now = bpf_ktime_get_ns();
	ev->key = (__u64)sk;
	ev->buf = (__u64)data;
	ev->enter_ns = now;
	ev->exit_ns = now;
	l7_capture(ctx, ev, sk, &l7_parsers_tp);
}

/* The exit side lives in one program that every exit tracepoint tail-calls, so the verifier
 * checks it once instead of once per syscall. */
SEC("tp")
int l7_capture_tp(struct trace_event_raw_sys_exit *ctx)
{
	exit_io(ctx, ctx->ret);
	return 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32)); /* sizes, not BTF types: prog arrays take no BTF */
	__array(values, int(void *));
} l7_capture_prog SEC(".maps") = {
	.values = { [0] = (void *)&l7_capture_tp },
};

static __always_inline bool pass_io(__u8 dir, __u8 io)
{
	struct l7_event *ev = l7_event();

	if (!ev)
		return false;
	ev->dir = dir;
	ev->io = io;
	return true;
}

/* One exit tracepoint per data syscall: it fires only for that syscall, and a call that
 * moved no bytes returns at once. */
#define L7_EXIT(name, dir, io)                                                               \
	SEC("tp/syscalls/sys_exit_" #name)                                                   \
	int l7_exit_##name(struct trace_event_raw_sys_exit *ctx)                             \
	{                                                                                    \
		if (ctx->ret > 0 && pass_io(dir, io) && L7_STAGE > L7_STAGE_EXIT)            \
			bpf_tail_call(ctx, &l7_capture_prog, 0);                             \
		return 0;                                                                    \
	}

L7_EXIT(read, L7_DIR_IN, IO_PLAIN)
L7_EXIT(recvfrom, L7_DIR_IN, IO_PLAIN)
L7_EXIT(readv, L7_DIR_IN, IO_IOV)
L7_EXIT(recvmsg, L7_DIR_IN, IO_MSG)
L7_EXIT(recvmmsg, L7_DIR_IN, IO_MMSG)
L7_EXIT(write, L7_DIR_OUT, IO_PLAIN)
L7_EXIT(sendto, L7_DIR_OUT, IO_PLAIN)
L7_EXIT(writev, L7_DIR_OUT, IO_IOV)
L7_EXIT(sendmsg, L7_DIR_OUT, IO_MSG)
L7_EXIT(sendmmsg, L7_DIR_OUT, IO_MMSG)
L7_EXIT(sendfile64, L7_DIR_OUT, IO_SENDFILE)

/* ---- TLS: OpenSSL's SSL_read/SSL_write see the plaintext ------------------------------------- */

static __always_inline int tls_enter(void *ssl, const void *buf, void *out_len, __u8 dir)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 key = (__u64)ssl;
	struct tls_args *t;
	__u64 *skp;

	if (!traced_task(tgid))
		return 0;
	t = tls_args_of_thread(true);
	if (!t)
		return 0;
	t->ssl = key;
	t->buf = (__u64)buf;
	t->out_len = (__u64)out_len;
	t->enter_ns = bpf_ktime_get_ns();
	t->dir = dir;
	t->active = 1;
	skp = bpf_map_lookup_elem(&tls_socks, &key);
	if (dir == L7_DIR_IN && skp)
		http_read_begins(*skp | TLS_KEY_BIT);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(tls_write_enter, void *ssl, const void *buf, int num)
{
	return tls_enter(ssl, buf, NULL, L7_DIR_OUT);
}

SEC("uprobe")
int BPF_KPROBE(tls_read_enter, void *ssl, void *buf, int num)
{
	return tls_enter(ssl, buf, NULL, L7_DIR_IN);
}

SEC("uprobe")
int BPF_KPROBE(tls_write_ex_enter, void *ssl, const void *buf, size_t num, size_t *written)
{
	return tls_enter(ssl, buf, written, L7_DIR_OUT);
}

SEC("uprobe")
int BPF_KPROBE(tls_read_ex_enter, void *ssl, void *buf, size_t num, size_t *readbytes)
{
	return tls_enter(ssl, buf, readbytes, L7_DIR_IN);
}

SEC("uprobe")
int BPF_KPROBE(tls_handshake_enter, void *ssl)
{
	return tls_enter(ssl, NULL, NULL, 0);
}

/* One return probe for every SSL function above: the parked arguments say which it was. */
SEC("uretprobe")
int BPF_KRETPROBE(tls_exit, long ret)
{
	struct tls_args *tp = tls_args_of_thread(false);
	struct l7_event *ev = l7_event();
	struct tls_args t;
	__u64 n = 0, *skp, sk;
	__u8 transport = L7_TCP;

	if (!tp || !tp->active || !ev)
		return 0;
	t = *tp;
	tp->active = 0;
	if (!t.dir)
		return 0;
	if (t.out_len) {
		if ((int)ret != 1 || bpf_probe_read_user(&n, sizeof(n), (void *)t.out_len))
			return 0;
	} else {
		if ((int)ret <= 0)
			return 0;
		n = (int)ret;
	}
	skp = bpf_map_lookup_elem(&tls_socks, &t.ssl);
	if (!skp || !n)
		return 0;
	sk = *skp;
	ev->key = sk | TLS_KEY_BIT;
	ev->dir = t.dir;
	ev->io = IO_PLAIN;
	ev->transport = transport;
	ev->peer_family = 0;
	ev->buf = t.buf;
	ev->first_len = n;
	ev->total = n;
	ev->iovs = 0;
	ev->niov = 0;
	ev->enter_ns = t.enter_ns;
	ev->exit_ns = bpf_ktime_get_ns();
	l7_capture(ctx, ev, (const struct sock *)sk, &l7_parsers_uprobe);
	return 0;
}

/* ---- the end of a connection ------------------------------------------------------------------ */

/* close(): the process ends the connection. */
SEC("tp/syscalls/sys_enter_close")
int l7_close(struct trace_event_raw_sys_enter *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u8 transport;
	struct sock *sk;

	if (tgid == self_tgid)
		return 0;
	sk = sock_of_fd(ctx->args[0], &transport);
	if (!sk)
		return 0;
	l7_end((__u64)sk, true);
	l7_end((__u64)sk | TLS_KEY_BIT, true);
	return 0;
}

/* A socket that closes without a close() from its process (it exited or was killed and the
 * kernel closed its files, or a reset) ends its connection too. Runs on every TCP state change
 * and acts on the last; a close() has ended the connection before it. */
static __always_inline int sock_closed(__u64 key)
{
	l7_end(key, false);
	l7_end(key | TLS_KEY_BIT, false);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(l7_sock_close_btf, const struct sock *sk, int oldstate, int newstate)
{
	__u64 key = 0;

	/* As a number: a kernel pointer may not be masked or used as map key bytes. */
	bpf_probe_read_kernel(&key, sizeof(key), &sk);
	self_conn_state(key, newstate);
	if (newstate != TCP_CLOSE)
		return 0;
	return sock_closed(key);
}

SEC("tp/sock/inet_sock_set_state")
int l7_sock_close_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	self_conn_state((__u64)ctx->skaddr, ctx->newstate);
	if (ctx->newstate != TCP_CLOSE)
		return 0;
	return sock_closed((__u64)ctx->skaddr);
}
