/* The agent's own connections, seen from their other end.
 *
 * The agent's calls are never captured (self_tgid), but a collector on this host receiving the
 * agent's exports is an ordinary traced process: its server side of those connections became
 * exchanges, spans and metrics, which the agent exported in turn (a feedback loop that cost a
 * tenth of the agent's CPU under load). Here the kernel recognises the other end exactly, by
 * the connection's 4-tuple, before any byte of it is captured:
 *
 *   1. connect(): TCP_SYN_SENT is set inside the connecting task's own syscall (tcp_v4_connect,
 *      tcp_v6_connect), so the current task says whether the socket is the agent's. Its source
 *      port is not chosen yet (inet_hash_connect runs after), so the socket's address is kept.
 *   2. TCP_ESTABLISHED of such a socket (on the SYN-ACK, in any context): its 4-tuple is now
 *      complete and is kept. This runs before the client's ACK is sent, so before the server's
 *      socket exists: no server-side call can come first.
 *   3. conn_for, on a connection's first call: a connection whose remote end is one of those
 *      4-tuples is the far end of the agent's own, and is filtered (nothing of it crosses).
 *   4. TCP_CLOSE of the agent's socket forgets it.
 *
 * Only while self_tgid is set (probes.l7.trace_agent off). */
#pragma once

#include "capture.h"

/* A connection as its client sees it; IPv4-mapped IPv6 addresses as plain IPv4 (a dual-stack
 * client socket and an IPv4 server socket name one connection differently). */
struct l7_self_conn {
	__u8 caddr[16];
	__u8 saddr[16];
	__u16 cport;
	__u16 sport;
	__u8 family;
	__u8 _pad[3];
};

/* The agent's sockets between connect() and their 4-tuple being known (step 1). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct l7_self_conn);
} l7_self_socks SEC(".maps");

/* The agent's established connections (step 2) -> their socket. LRU: a close we miss must not
 * fill it; the agent keeps few connections (one per exporter and endpoint). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct l7_self_conn);
	__type(value, __u64);
} l7_self_conns SEC(".maps");

static __always_inline void self_canon(__u8 *addr, __u8 *family)
{
	__u32 *w = (__u32 *)addr;

	if (*family == AF_INET6 && !w[0] && !w[1] && w[2] == bpf_htonl(0xffff)) {
		w[0] = w[3];
		w[2] = w[3] = 0;
		*family = AF_INET;
	}
}

/* Both ends' addresses from an identity (local = client's, remote = server's, or the
 * reverse), each canonical; false when the two disagree on the family. */
static __always_inline bool self_key(struct l7_self_conn *k, const struct l7_header *h,
				     bool local_is_client)
{
	__u8 lf = h->family, rf = h->family;

	__builtin_memcpy(local_is_client ? k->caddr : k->saddr, h->laddr, 16);
	__builtin_memcpy(local_is_client ? k->saddr : k->caddr, h->raddr, 16);
	self_canon(local_is_client ? k->caddr : k->saddr, &lf);
	self_canon(local_is_client ? k->saddr : k->caddr, &rf);
	k->cport = local_is_client ? h->lport : h->rport;
	k->sport = local_is_client ? h->rport : h->lport;
	k->family = lf;
	return lf == rf;
}

/* Steps 1, 2 and 4, from inet_sock_set_state. */
static __always_inline void self_conn_state(__u64 skaddr, int newstate)
{
	struct l7_self_conn k = {};
	struct l7_header h = {};
	__u64 *known;

	if (!self_tgid)
		return;
	if (newstate == TCP_SYN_SENT) {
		if ((bpf_get_current_pid_tgid() >> 32) == self_tgid)
			bpf_map_update_elem(&l7_self_socks, &skaddr, &k, BPF_ANY);
		return;
	}
	if (newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE)
		return;
	known = bpf_map_lookup_elem(&l7_self_socks, &skaddr);
	if (!known)
		return;
	if (newstate == TCP_CLOSE) {
		bpf_map_delete_elem(&l7_self_conns, known);
		bpf_map_delete_elem(&l7_self_socks, &skaddr);
		return;
	}
	fill_identity(&h, (const struct sock *)skaddr);
	if (!self_key(&k, &h, true))
		return;
	/* The socket's entry keeps its 4-tuple, so its close finds what to forget. */
	bpf_map_update_elem(&l7_self_socks, &skaddr, &k, BPF_ANY);
	bpf_map_update_elem(&l7_self_conns, &k, &skaddr, BPF_ANY);
}

/* Step 3: is the connection of identity `h` (as its own process sees it) the far end of one of
 * the agent's? */
static __always_inline bool self_conn_peer(const struct l7_header *h)
{
	struct l7_self_conn k = {};

	if (!self_tgid || h->flags & L7_FLAG_UDP)
		return false;
	return self_key(&k, h, false) && bpf_map_lookup_elem(&l7_self_conns, &k);
}
