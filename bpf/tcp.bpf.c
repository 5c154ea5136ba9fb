// SPDX-License-Identifier: GPL-2.0
/* tcp family: connections opened/closed/failed, bytes, duration, RTT, retransmits, resets.
 * Everything is aggregated in kernel (per-CPU map read at scrape); no ring records. */
#include "common.h"
#include <bpf/bpf_endian.h>
#include "tcp.h"

char LICENSE[] SEC("license") = "GPL";

#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_ 2
#define TCP_SYN_RECV_ 3
#define TCP_FIN_WAIT1_ 4
#define TCP_FIN_WAIT2_ 5
#define TCP_CLOSE_ 7
#define TCP_LAST_ACK_ 9
#define TCP_LISTEN_ 10
#define TCP_CLOSING_ 11
#define SOCK_DONE_BIT 1

/* Backs probewire_tcp_* metrics: bounded keys, LRU so a churn of owners cannot fill it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tcp_flow_key);
	__type(value, struct tcp_flow_stats);
} tcp_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct tcp_conn);
} tcp_conns SEC(".maps");

/* Local port -> owning process, filled at listen() and seeded by user space from /proc. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct tcp_listener);
} tcp_listeners SEC(".maps");

static struct tcp_flow_stats zero_stats;

static __always_inline struct tcp_flow_stats *stats_for(const struct tcp_flow_key *key)
{
	struct tcp_flow_stats *s = bpf_map_lookup_elem(&tcp_stats, key);

	if (s)
		return s;
	bpf_map_update_elem(&tcp_stats, key, &zero_stats, BPF_NOEXIST);
	return bpf_map_lookup_elem(&tcp_stats, key);
}

static __always_inline void key_from_sock(struct tcp_flow_key *key, const struct sock *sk, __u8 dir,
					  __u32 tgid)
{
	key->tgid = tgid;
	key->direction = dir;
	key->family = KREAD(struct sock, sk, __sk_common.skc_family);
	if (dir == TCP_DIR_SERVER) {
		key->port = KREAD(struct sock, sk, __sk_common.skc_num);
		return;
	}
	key->port = bpf_ntohs(KREAD(struct sock, sk, __sk_common.skc_dport));
	if (key->family == AF_INET)
		KCOPY(key->raddr, 4, struct sock, sk, __sk_common.skc_daddr);
	else
		KCOPY(key->raddr, 16, struct sock, sk, __sk_common.skc_v6_daddr);
}

/* A connection the agent did not see open (it predates the agent, or is not traced). */
static __always_inline void key_for_unowned(struct tcp_flow_key *key, const struct sock *sk)
{
	__u32 lport = KREAD(struct sock, sk, __sk_common.skc_num);
	struct tcp_listener *l = bpf_map_lookup_elem(&tcp_listeners, &lport);

	if (l)
		key_from_sock(key, sk, TCP_DIR_SERVER, l->tgid);
	else
		key_from_sock(key, sk, TCP_DIR_CLIENT, 0);
}

static __always_inline bool sock_is_tcp(const struct sock *sk)
{
	__u16 family = KREAD(struct sock, sk, __sk_common.skc_family);

	return KREAD(struct sock, sk, sk_protocol) == IPPROTO_TCP &&
	       (family == AF_INET || family == AF_INET6);
}

static __always_inline void on_listen(const struct sock *sk)
{
	__u32 port = KREAD(struct sock, sk, __sk_common.skc_num);
	struct tcp_listener l = {
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.cgroup_id = bpf_get_current_cgroup_id(),
	};

	bpf_map_update_elem(&tcp_listeners, &port, &l, BPF_ANY);
}

static __always_inline void on_connect(const struct sock *sk)
{
	/* connect() runs in the caller's context: the owner is the current process. */
	__u64 skp = (__u64)sk;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct tcp_conn conn = { .start_ns = bpf_ktime_get_ns() };

	key_from_sock(&conn.key, sk, TCP_DIR_CLIENT, tgid);
	if (!is_traced_task(tgid, KREAD(struct sock, sk, __sk_common.skc_num), conn.key.port))
		return;
	conn.seen_total_retrans = KREAD(struct tcp_sock, (const struct tcp_sock *)sk, total_retrans);
	bpf_map_update_elem(&tcp_conns, &skp, &conn, BPF_ANY);
}

static __always_inline void on_established(const struct sock *sk, int oldstate)
{
	__u64 skp = (__u64)sk;
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct tcp_conn *conn;
	struct tcp_flow_stats *s;

	if (oldstate == TCP_SYN_SENT_) {
		conn = bpf_map_lookup_elem(&tcp_conns, &skp);
		if (!conn)
			return;
	} else if (oldstate == TCP_SYN_RECV_) {
		/* Runs in softirq: the owner is the listener's process, not the current task. */
		__u32 lport = KREAD(struct sock, sk, __sk_common.skc_num);
		struct tcp_listener *l = bpf_map_lookup_elem(&tcp_listeners, &lport);
		struct tcp_conn fresh = { .start_ns = bpf_ktime_get_ns() };
		__u16 rport;

		key_from_sock(&fresh.key, sk, TCP_DIR_SERVER, l ? l->tgid : 0);
		rport = bpf_ntohs(KREAD(struct sock, sk, __sk_common.skc_dport));
		if (!is_traced(fresh.key.tgid, l ? l->cgroup_id : 0, lport, rport))
			return;
		/* A child starts with total_retrans = its SYN-ACK retransmits, which the synack
		 * hook already counted on the listener. */
		fresh.seen_total_retrans = KREAD(struct tcp_sock, tp, total_retrans);
		bpf_map_update_elem(&tcp_conns, &skp, &fresh, BPF_ANY);
		conn = bpf_map_lookup_elem(&tcp_conns, &skp);
		if (!conn)
			return;
	} else {
		return;
	}
	/* The handshake already moved bytes_acked by one (our SYN): remember the baseline. */
	conn->base_bytes_acked = KREAD(struct tcp_sock, tp, bytes_acked);
	conn->base_bytes_received = KREAD(struct tcp_sock, tp, bytes_received);
	s = stats_for(&conn->key);
	if (s)
		s->opened += 1;
}

/* Adds the segments tcp_sock.total_retrans grew by since the connection was last seen. The
 * kernel grows it and TcpRetransSegs by the same tcp_skb_pcount in __tcp_retransmit_skb, before
 * it transmits (a send error after that still counts) and before the tracepoint fires. A tp_btf
 * program does not run when it would nest in itself on one CPU (a softirq, or a task preempting
 * one whose retransmit runs in process context with BH on, fires the event again: the kernel
 * counts a recursion miss and skips it), so counting one skb per event loses segments under
 * load; the socket's own total does not. Retransmits of one socket are serialized by its lock. */
static __always_inline void catch_up_retransmits(struct tcp_conn *conn, struct tcp_flow_stats *s,
						  const struct sock *sk)
{
	__u32 now = KREAD(struct tcp_sock, (const struct tcp_sock *)sk, total_retrans);

	s->retransmits += (__u32)(now - conn->seen_total_retrans);
	conn->seen_total_retrans = now;
}

static __always_inline void on_close(const struct sock *sk, int oldstate)
{
	__u64 skp = (__u64)sk;
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct tcp_conn *conn = bpf_map_lookup_elem(&tcp_conns, &skp);
	struct tcp_flow_stats *s;
	__u64 acked, received, duration_us, srtt_us;
	unsigned long sk_flags;

	if (!conn)
		return; /* opened before the agent started, or filtered out */
	s = stats_for(&conn->key);
	if (!s)
		goto out;
	catch_up_retransmits(conn, s, sk);
	if (oldstate == TCP_SYN_SENT_) {
		s->failed += 1;
		goto out;
	}
	/* bytes_acked/bytes_received count sequence space, which includes a FIN each way:
	 * take our FIN out once it is acked, and the peer's once it arrived (SOCK_DONE). */
	acked = KREAD(struct tcp_sock, tp, bytes_acked) - conn->base_bytes_acked;
	if ((oldstate == TCP_FIN_WAIT1_ || oldstate == TCP_FIN_WAIT2_ || oldstate == TCP_CLOSING_ ||
	     oldstate == TCP_LAST_ACK_) &&
	    KREAD(struct tcp_sock, tp, snd_una) == KREAD(struct tcp_sock, tp, write_seq) && acked > 0)
		acked -= 1;
	received = KREAD(struct tcp_sock, tp, bytes_received) - conn->base_bytes_received;
	sk_flags = KREAD(struct sock, sk, __sk_common.skc_flags); /* sk_flags is #defined to this */
	if ((sk_flags & (1UL << SOCK_DONE_BIT)) && received > 0)
		received -= 1;
	duration_us = (bpf_ktime_get_ns() - conn->start_ns) / 1000;
	srtt_us = KREAD(struct tcp_sock, tp, srtt_us) >> 3; /* srtt_us is stored << 3 */

	s->closed += 1;
	s->bytes_sent += acked;
	s->bytes_received += received;
	s->duration_us_sum += duration_us;
	s->duration_us_slots[log2_slot(duration_us) & (LOG2_SLOTS - 1)] += 1;
	s->rtt_us_sum += srtt_us;
	s->rtt_us_slots[log2_slot(srtt_us) & (LOG2_SLOTS - 1)] += 1;
out:
	bpf_map_delete_elem(&tcp_conns, &skp);
}

static __always_inline int handle_state(const struct sock *sk, int oldstate, int newstate)
{
	if (!sock_is_tcp(sk))
		return 0;
	switch (newstate) {
	case TCP_LISTEN_:
		on_listen(sk);
		break;
	case TCP_SYN_SENT_:
		on_connect(sk);
		break;
	case TCP_ESTABLISHED_:
		on_established(sk, oldstate);
		break;
	case TCP_CLOSE_:
		on_close(sk, oldstate);
		break;
	}
	return 0;
}

/* Every TCP state change passes here: open, close, listen. Costs one map op per change,
 * nothing per packet. tp_btf gives typed arguments; tp/ is the fallback for kernels
 * without BTF-enabled tracepoints. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tcp_state_btf, const struct sock *sk, const int oldstate, const int newstate)
{
	return handle_state(sk, oldstate, newstate);
}

SEC("tp/sock/inet_sock_set_state")
int tcp_state_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	return handle_state((const struct sock *)ctx->skaddr, ctx->oldstate, ctx->newstate);
}

static __always_inline __u32 skb_tcp_segs(const struct sk_buff *skb)
{
	struct tcp_skb_cb *tcb = (struct tcp_skb_cb *)__builtin_preserve_access_index(&skb->cb);
	__u16 segs = BPF_CORE_READ(tcb, tcp_gso_segs);

	return segs ? segs : 1;
}

static __always_inline int handle_retransmit(const struct sock *sk, const struct sk_buff *skb,
					     int err)
{
	__u64 skp = (__u64)sk;
	struct tcp_conn *conn;
	struct tcp_flow_key key = {};
	struct tcp_flow_stats *s;

	conn = bpf_map_lookup_elem(&tcp_conns, &skp);
	if (conn) {
		s = stats_for(&conn->key);
		if (s)
			catch_up_retransmits(conn, s, sk);
		return 0;
	}
	/* A connection that predates the agent has no baseline: one event, one skb. Since 6.9
	 * the hook also fires for attempts that failed before anything was counted (-EBUSY,
	 * -ENOMEM, ...); those after the count (a send error) are lost to this path. */
	if (err)
		return 0;
	key_for_unowned(&key, sk);
	if (!is_traced(key.tgid, 0, KREAD(struct sock, sk, __sk_common.skc_num), key.port))
		return 0;
	s = stats_for(&key);
	if (s)
		s->retransmits += skb_tcp_segs(skb);
	return 0;
}

/* Retransmitted segments (loss, RTO, tail-loss probes). Rare by nature: cheap.
 * The tracepoint gained `err` in 6.9 (it fires for failed attempts since): its third argument
 * is read only where the event has the field, so the verifier of an older kernel, whose
 * tracepoint has two arguments, never sees the read (it rejects ctx access past the last). */
SEC("tp_btf/tcp_retransmit_skb")
int tcp_retransmit_btf(__u64 *ctx)
{
	int err = 0;

	if (bpf_core_field_exists(struct trace_event_raw_tcp_retransmit_skb, err))
		err = (int)ctx[2];
	return handle_retransmit((const struct sock *)ctx[0], (const struct sk_buff *)ctx[1], err);
}

/* Before 6.9 (tcp_retransmit_skb) and 6.10 (tcp_send_reset) both events were of the
 * tcp_event_sk_skb class, and their tracefs record is that class's struct (5.10 and 6.1 have no
 * trace_event_raw_tcp_retransmit_skb). The ___old flavor matches it by CO-RE. */
struct trace_event_raw_tcp_event_sk_skb___old {
	const void *skbaddr;
	const void *skaddr;
	__u16 sport; /* host order: the event stores ntohs(inet_sport) */
} __attribute__((preserve_access_index));

SEC("tp/tcp/tcp_retransmit_skb")
int tcp_retransmit_tp(void *ctx)
{
	struct trace_event_raw_tcp_retransmit_skb *e = ctx;
	struct trace_event_raw_tcp_event_sk_skb___old *old = ctx;
	int err = 0;

	if (!bpf_core_type_exists(struct trace_event_raw_tcp_retransmit_skb))
		return handle_retransmit((const struct sock *)old->skaddr,
					 (const struct sk_buff *)old->skbaddr, 0);
	if (bpf_core_field_exists(e->err))
		err = BPF_CORE_READ(e, err);
	return handle_retransmit((const struct sock *)e->skaddr,
				 (const struct sk_buff *)e->skbaddr, err);
}

/* SYN-ACK retransmits bypass tcp_retransmit_skb but count in TcpRetransSegs. */
static __always_inline int handle_synack_retransmit(const struct sock *listener)
{
	__u32 lport = KREAD(struct sock, listener, __sk_common.skc_num);
	struct tcp_listener *l = bpf_map_lookup_elem(&tcp_listeners, &lport);
	struct tcp_flow_key key = {};
	struct tcp_flow_stats *s;

	key_for_unowned(&key, listener);
	/* The listener's cgroup, as on_established checks it: a cgroup filter would otherwise
	 * drop every SYN-ACK retransmit while counting the connection they belong to. */
	if (!is_traced(key.tgid, l ? l->cgroup_id : 0, key.port, 0))
		return 0;
	s = stats_for(&key);
	if (s)
		s->retransmits += 1;
	return 0;
}

SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(tcp_retransmit_synack_btf, const struct sock *sk, const struct request_sock *req)
{
	return handle_synack_retransmit(sk);
}

/* tcp_rtx_synack fires the tracepoint exactly when it returns 0 (the SYN-ACK went out). */
SEC("fexit/tcp_rtx_synack")
int BPF_PROG(tcp_retransmit_synack_fexit, const struct sock *sk, struct request_sock *req, int ret)
{
	return ret ? 0 : handle_synack_retransmit(sk);
}

SEC("tp/tcp/tcp_retransmit_synack")
int tcp_retransmit_synack_tp(struct trace_event_raw_tcp_retransmit_synack *ctx)
{
	return handle_synack_retransmit((const struct sock *)ctx->skaddr);
}

/* Resets: sk is NULL when the kernel answers a segment no socket owns (closed port). */
static __always_inline int count_reset(const struct sock *sk, __u16 local_port, bool sent)
{
	__u64 skp = (__u64)sk;
	struct tcp_conn *conn = sk ? bpf_map_lookup_elem(&tcp_conns, &skp) : NULL;
	struct tcp_flow_key key = {};
	struct tcp_flow_stats *s;

	if (conn) {
		key = conn->key;
	} else if (sk) {
		key_for_unowned(&key, sk);
		if (!is_traced(key.tgid, 0, KREAD(struct sock, sk, __sk_common.skc_num), key.port))
			return 0;
	} else {
		__u32 port = local_port;
		struct tcp_listener *l = bpf_map_lookup_elem(&tcp_listeners, &port);

		key.direction = TCP_DIR_SERVER;
		key.port = local_port;
		key.tgid = l ? l->tgid : 0;
		if (!is_traced(key.tgid, 0, local_port, 0))
			return 0;
	}
	s = stats_for(&key);
	if (!s)
		return 0;
	if (sent)
		s->resets_sent += 1;
	else
		s->resets_received += 1;
	return 0;
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(tcp_send_reset_btf, const struct sock *sk, const struct sk_buff *skb)
{
	struct tcphdr th = {};

	/* The hook passes the segment being answered; its destination is our local port. */
	if (skb)
		bpf_probe_read_kernel(&th, sizeof(th), BPF_CORE_READ(skb, data));
	return count_reset(sk, bpf_ntohs(th.dest), true);
}

SEC("tp/tcp/tcp_send_reset")
int tcp_send_reset_tp(void *ctx)
{
	struct trace_event_raw_tcp_send_reset *e = ctx;
	struct trace_event_raw_tcp_event_sk_skb___old *old = ctx;
	struct sockaddr_in sa = {};

	/* Before 6.10 the event fired only for a reset sent on a socket, and names its port. */
	if (!bpf_core_type_exists(struct trace_event_raw_tcp_send_reset))
		return count_reset((const struct sock *)old->skaddr, old->sport, true);
	/* The tracepoint stores the reply's addresses: saddr is our side. */
	bpf_probe_read_kernel(&sa, sizeof(sa), e->saddr);
	return count_reset((const struct sock *)e->skaddr, bpf_ntohs(sa.sin_port), true);
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(tcp_receive_reset_btf, struct sock *sk)
{
	return count_reset(sk, 0, false);
}

/* tcp_reset fires the tracepoint first thing, on every kernel we run (its skb argument,
 * added in 5.14, is not read). fentry costs what tp_btf costs; a kprobe, the last resort for
 * kernels without BPF trampolines, costs more (an int3 or ftrace round trip). */
SEC("fentry/tcp_reset")
int BPF_PROG(tcp_receive_reset_fentry, struct sock *sk)
{
	return count_reset(sk, 0, false);
}

SEC("kprobe/tcp_reset")
int BPF_KPROBE(tcp_receive_reset_kprobe, struct sock *sk)
{
	return count_reset(sk, 0, false);
}

SEC("tp/tcp/tcp_receive_reset")
int tcp_receive_reset_tp(struct trace_event_raw_tcp_event_sk *ctx)
{
	return count_reset((const struct sock *)ctx->skaddr, 0, false);
}
