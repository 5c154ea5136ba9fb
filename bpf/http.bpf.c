// SPDX-License-Identifier: GPL-2.0
/* http family: HTTP/1.x exchanges seen through syscall tracepoints (no kprobes needed).
 *
 * Exit hooks of the data syscalls resolve fd -> struct sock (the arguments come back from the
 * registers saved at entry) and look at the bytes the call moved. Per connection (keyed by
 * struct sock, not PID) a small state machine finds message starts (request line / status line
 * at the start of a buffer), keeps the first bytes of each head, counts bytes, and ends an
 * exchange when its response's last byte is written (or at the next request, or the close).
 * An exchange whose path user space has templated is counted in kernel maps (http_aggs);
 * others go to user space as one record. Method, status, role, header lengths and body sizes
 * are decided here; path templating and pipelined heads are user space's. */
#include "common.h"
#include <bpf/bpf_endian.h>
#include "http.h"
#include "http_parse.h"

char LICENSE[] SEC("license") = "GPL";

/* Load-time setting: the agent's own pid, whose /metrics traffic is not the host's. */
const volatile __u32 self_tgid = 0;

static __always_inline bool traced_task(__u32 tgid)
{
	return tgid != self_tgid && is_traced_task(tgid, 0, 0);
}

#define DIR_IN 1
#define DIR_OUT 2
#define IO_PLAIN 0
#define IO_IOV 1
#define IO_MSG 2
#define IO_SENDFILE 3
#define S_IFMT_ 00170000
#define S_IFSOCK_ 0140000
#define HTTP_PROTO_FILTERED 3
#define TLS_KEY_BIT 1ULL

/* Connection state; LRU because a close we never see (process exit) must not leak it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct http_conn);
} http_conns SEC(".maps");

/* probewire_http_unrecognized_connections_total{transport="tls"} */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} tls_unrecognized SEC(".maps");

struct http_exchange *btf_export_http_exchange __attribute__((unused));
struct h2_chunk *btf_export_h2_chunk __attribute__((unused));

/* HTTP/2 chunks: larger records than exchanges, so a ring of their own (decoded as one
 * fixed-size array per drain, like every ring). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} h2_events SEC(".maps");
static struct http_conn zero_conn;

/* Runs for every data syscall of a traced process. The fd table slot is the one read that
 * needs a helper (a variable index into a pointer array). */
static __always_inline struct sock *tcp_sock_of_fd(int fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = task->files->fdt;
	struct file *file = NULL;
	struct socket *sock;
	struct sock *sk;
	__u16 family;

	if (fd < 0 || (unsigned int)fd >= fdt->max_fds)
		return NULL;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fdt->fd[fd]) || !file)
		return NULL;
	if (KFUNCS) {
		struct file *f = CAST(struct file, file);

		if ((f->f_inode->i_mode & S_IFMT_) != S_IFSOCK_)
			return NULL;
		const struct sock *s;

		sock = CAST(struct socket, f->private_data);
		/* Read by helper: a plain load would make it a kernel pointer to the verifier,
		 * and the socket's address is hashed and masked as a map key. */
		if (bpf_probe_read_kernel(&sk, sizeof(sk), &sock->sk))
			return NULL;
		s = CAST(struct sock, sk);
		if (!sk || s->sk_protocol != IPPROTO_TCP)
			return NULL;
		family = s->__sk_common.skc_family;
	} else {
		if ((BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT_) != S_IFSOCK_)
			return NULL;
		sock = BPF_CORE_READ(file, private_data);
		sk = BPF_CORE_READ(sock, sk);
		if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
			return NULL;
		family = BPF_CORE_READ(sk, __sk_common.skc_family);
	}
	if (family != AF_INET && family != AF_INET6)
		return NULL;
	return sk;
}

/* (local port, remote port in network order) of a socket. */
static __always_inline void sock_ports(const struct sock *sk, __u16 *lport, __u16 *dport_be)
{
	*lport = KREAD(struct sock, sk, __sk_common.skc_num);
	*dport_be = KREAD(struct sock, sk, __sk_common.skc_dport);
}

/* barrier_var (bpf_helpers.h) keeps a clamped size in the register the helper call uses:
 * clang may otherwise compare a zero-extended copy and pass the unclamped original. */
static __always_inline void head_append(__u8 *head, __u16 *len, const void *buf, __u64 n)
{
	__u64 off = *len;
	__u64 sz = n;

	if (off == 0) {
		if (sz > HTTP_HEAD_LEN)
			sz = HTTP_HEAD_LEN;
		barrier_var(sz);
		bpf_probe_read_user(head, sz, buf);
	} else if (off <= HTTP_HEAD_LEN - HTTP_APPEND_CHUNK) {
		if (sz > HTTP_APPEND_CHUNK)
			sz = HTTP_APPEND_CHUNK;
		barrier_var(sz);
		barrier_var(off);
		bpf_probe_read_user(head + off, sz, buf);
	} else {
		return;
	}
	*len = off + sz;
}

/* ---- In-kernel aggregation (see http.h) ------------------------------------------------- */

/* Load-time settings: off when every exchange must reach user space (spans); the bucket
 * boundaries are user space's, so kernel and exported buckets are one and the same. */
const volatile __u8 aggregate = 1;
const volatile __u64 duration_bounds_ns[HTTP_DURATION_BOUNDS] = {
	5000000, 10000000, 25000000, 50000000, 75000000, 100000000, 250000000,
	500000000, 750000000, 1000000000, 2500000000, 5000000000, 7500000000, 10000000000,
};
const volatile __u64 size_bounds[HTTP_SIZE_BOUNDS] = {
	0, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
};

/* path hash -> route id, written by user space when it has templated a path. LRU: a path
 * forgotten is learnt again from its next record. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u32);
} http_routes SEC(".maps");

/* http_server_request_duration_seconds and friends, per label-ish key, per CPU. Entries are
 * never deleted while their process lives (user space adds each key's growth), so no count
 * is lost to a race; a full map sends the exchange through the ring instead. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct http_agg_key);
	__type(value, struct http_agg);
} http_aggs SEC(".maps");

/* Local end of each HTTP client connection -> its process (see struct http_endpoint). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct http_endpoint);
	__type(value, __u32);
} http_clients SEC(".maps");

static const struct http_agg zero_agg;
struct http_agg_key *btf_export_http_agg_key __attribute__((unused));
struct http_agg *btf_export_http_agg __attribute__((unused));
struct http_endpoint *btf_export_http_endpoint __attribute__((unused));

static __always_inline __u32 duration_bucket(__u64 v)
{
	__u32 idx = 0;

	for (int i = 0; i < HTTP_DURATION_BOUNDS; i++)
		idx += duration_bounds_ns[i] < v;
	return idx;
}

static __always_inline __u32 size_bucket(__u64 v)
{
	__u32 idx = 0;

	for (int i = 0; i < HTTP_SIZE_BOUNDS; i++)
		idx += size_bounds[i] < v;
	return idx;
}

/* Server side: the process at the other end when it is a client on this host. Looked up per
 * exchange until found: the client's own hook may run after the server has read. */
static __always_inline void find_peer(struct http_exchange *ex)
{
	struct http_endpoint ep = {};
	__u32 *tgid;

	if (ex->role != HTTP_ROLE_SERVER || ex->peer_tgid)
		return;
	__builtin_memcpy(ep.addr, ex->raddr, 16);
	ep.port = ex->rport;
	ep.family = ex->family;
	tgid = bpf_map_lookup_elem(&http_clients, &ep);
	if (tgid)
		ex->peer_tgid = *tgid;
}

static __always_inline void remember_client(const struct http_exchange *ex)
{
	struct http_endpoint ep = {};
	__u32 tgid = ex->tgid;

	__builtin_memcpy(ep.addr, ex->laddr, 16);
	ep.port = ex->lport;
	ep.family = ex->family;
	bpf_map_update_elem(&http_clients, &ep, &tgid, BPF_ANY);
}

/* A global function: the verifier checks it once, not once per completion site (its loops
 * would otherwise be walked for each of them). Returns 1 when the exchange was counted. */
/* The key is built in map memory: the call chain to here is deep, and 512 bytes of stack are
 * all a program gets across its frames. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_agg_key);
} agg_key_scratch SEC(".maps");

__noinline int aggregate_exchange(struct http_exchange *ex)
{
	struct http_agg_key *key;
	struct http_agg *agg;
	__u32 *route, zero = 0;
	__u64 duration;
	int req_hdr, resp_hdr;

	if (!ex || !ex->method || ex->pipe_idx)
		return 0; /* user space reads the head */
	ex->path_hash = path_hash(ex->req_head, ex->req_head_len, ex->method);
	route = bpf_map_lookup_elem(&http_routes, &ex->path_hash);
	if (!route)
		return 0; /* a new path: its record teaches user space the route */
	key = bpf_map_lookup_elem(&agg_key_scratch, &zero);
	if (!key)
		return 0;
	__builtin_memset(key, 0, sizeof(*key));
	key->tgid = ex->tgid;
	key->route = *route;
	key->status = ex->status;
	key->role = ex->role;
	key->method = ex->method;
	key->flags = ex->flags & (HTTP_FLAG_TLS | HTTP_FLAG_ABORTED);
	key->family = ex->family;
	__builtin_memcpy(key->raddr, ex->raddr, 16);
	if (ex->role == HTTP_ROLE_SERVER) {
		key->peer_tgid = ex->peer_tgid;
		key->lport = ex->lport;
		__builtin_memcpy(key->laddr, ex->laddr, 16);
	} else {
		key->rport = ex->rport;
	}
	agg = bpf_map_lookup_elem(&http_aggs, key);
	if (!agg) {
		bpf_map_update_elem(&http_aggs, key, &zero_agg, BPF_NOEXIST);
		agg = bpf_map_lookup_elem(&http_aggs, key);
		if (!agg)
			return 0; /* full: the ring still counts it */
	}
	duration = ex->end_ns > ex->start_ns ? ex->end_ns - ex->start_ns : 0;
	agg->count += 1;
	agg->duration_ns += duration;
	agg->duration[duration_bucket(duration) & 15] += 1;
	req_hdr = header_end(ex->req_head, ex->req_head_len);
	if (req_hdr >= 0) {
		__u64 body = ex->req_bytes > (__u64)req_hdr ? ex->req_bytes - req_hdr : 0;

		agg->req_body_count += 1;
		agg->req_body_bytes += body;
		agg->req_body[size_bucket(body) & 15] += 1;
	}
	if (ex->role == HTTP_ROLE_SERVER) {
		__u64 body;

		resp_hdr = ex->resp_header_end;
		if (resp_hdr < 0)
			resp_hdr = ex->resp_first_write;
		body = ex->resp_bytes > (__u64)resp_hdr ? ex->resp_bytes - resp_hdr : 0;
		agg->resp_body_bytes += body;
		agg->resp_body[size_bucket(body) & 15] += 1;
	}
	return 1;
}

/* An exchange is over: count it in the kernel if its route is known, else ship it. Global
 * (verified once): it is reached from many places of the state machine. */
__noinline int complete_exchange(struct http_conn *conn)
{
	if (!conn)
		return 0;
	find_peer(&conn->ex);
	if (aggregate && aggregate_exchange(&conn->ex))
		return 0;
	if (bpf_ringbuf_output(&events, &conn->ex, sizeof(conn->ex),
			       wakeup_flags(&events, sizeof(conn->ex), false)))
		count_drop();
	return 0;
}

static __always_inline void fill_tuple(struct http_exchange *ex, const struct sock *sk)
{
	ex->family = KREAD(struct sock, sk, __sk_common.skc_family);
	ex->lport = KREAD(struct sock, sk, __sk_common.skc_num);
	ex->rport = bpf_ntohs(KREAD(struct sock, sk, __sk_common.skc_dport));
	if (ex->family == AF_INET) {
		KCOPY(ex->laddr, 4, struct sock, sk, __sk_common.skc_rcv_saddr);
		KCOPY(ex->raddr, 4, struct sock, sk, __sk_common.skc_daddr);
	} else {
		KCOPY(ex->laddr, 16, struct sock, sk, __sk_common.skc_v6_rcv_saddr);
		KCOPY(ex->raddr, 16, struct sock, sk, __sk_common.skc_v6_daddr);
	}
}

static __always_inline struct http_conn *conn_for(const struct sock *sk, __u64 key, __u32 tgid)
{
	struct http_conn *conn = bpf_map_lookup_elem(&http_conns, &key);

	if (conn) {
		/* The address of a freed socket is reused: different ports mean a new connection.
		 * A reset socket has already given its local port back (inet_put_port zeroes it). */
		__u16 lport, dport_be;

		sock_ports(sk, &lport, &dport_be);
		if (conn->ex.rport == bpf_ntohs(dport_be) && (conn->ex.lport == lport || lport == 0))
			return conn;
	}
	bpf_map_update_elem(&http_conns, &key, &zero_conn, BPF_ANY);
	conn = bpf_map_lookup_elem(&http_conns, &key);
	if (!conn)
		return NULL;
	conn->ex.kind = HTTP_RECORD_EXCHANGE;
	conn->ex.conn_id = key;
	conn->ex.tgid = tgid;
	fill_tuple(&conn->ex, sk);
	if (!is_traced_task(tgid, conn->ex.lport, conn->ex.rport))
		conn->proto = HTTP_PROTO_FILTERED;
	return conn;
}

static __always_inline void start_message(struct http_conn *conn, __u8 *head, __u16 *head_len,
					  const void *buf, __u64 n)
{
	__u32 p = conn->partial_len;

	*head_len = 0;
	if (p) {
		__u64 word;

		/* Whole words: a byte loop here becomes a memmove, which BPF has not. */
		__builtin_memcpy(&word, conn->partial, 8);
		__builtin_memcpy(head, &word, 8);
		*head_len = p & 7;
	}
	head_append(head, head_len, buf, n);
	conn->partial_len = 0;
}

static __always_inline void new_exchange(struct http_conn *conn, __u8 method, __u64 start_ns,
					 __u64 req_bytes, __u32 tgid)
{
	conn->ex.tid = (__u32)bpf_get_current_pid_tgid();
	conn->ex.method = method;
	conn->ex.flags = (conn->ex.conn_id & TLS_KEY_BIT) ? HTTP_FLAG_TLS : 0;
	conn->ex.start_ns = start_ns;
	conn->ex.req_bytes = req_bytes;
	conn->ex.tgid = tgid;
	conn->ex.status = 0;
	conn->ex.pipe_idx = 0;
	conn->ex.end_ns = 0;
	conn->ex.resp_bytes = 0;
	conn->ex.resp_head_len = 0;
	conn->ex.resp_first_write = 0;
	conn->ex.path_hash = 0;
	conn->ex.resp_header_end = -1;
	conn->state = HTTP_STATE_REQUEST;
}

/* Global (verified once): a server's response head is copied and its bounds read (its
 * header length gives the body size). A client's is not needed: its status is known. */
__noinline int response_head(struct http_conn *conn, __u64 buf)
{
	if (!conn)
		return 0;
	conn->ex.resp_head_len = 0;
	conn->resp_end_at = 0;
	if (conn->ex.role != HTTP_ROLE_SERVER)
		return 0;
	head_append(conn->ex.resp_head, &conn->ex.resp_head_len, (const void *)buf,
		    conn->ex.resp_first_write);
	if (conn->ex.method)
		conn->ex.resp_header_end = response_bounds(
			conn->ex.resp_head, conn->ex.resp_head_len, conn->ex.status,
			conn->ex.method == HTTP_HEAD, &conn->resp_end_at);
	else /* a pipelined request's method is not known here: no end for it (HEAD?) */
		conn->ex.resp_header_end = header_end(conn->ex.resp_head, conn->ex.resp_head_len);
	return 0;
}

static __always_inline void response_started(struct http_conn *conn, __u16 status, __u64 now,
					     const void *buf, __u64 n, __u32 first_len)
{
	conn->ex.status = status;
	conn->ex.end_ns = now;
	conn->ex.resp_bytes = n;
	conn->ex.resp_first_write = first_len;
	response_head(conn, (__u64)buf);
}

struct iovecs8 {
	struct iovec v[8];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct iovecs8);
} iov_scratch SEC(".maps");

/* Did this write end with the last chunk? Its final bytes are CRLF "0" CRLF CRLF (the CRLF
 * that ends the previous chunk or the head), or just "0" CRLF CRLF when written alone. Up to
 * 8 iovecs are followed to the one holding the write's last byte; more, or sendfile, is not
 * looked at (the next request or close then ends the exchange). */
static __always_inline bool wrote_last_chunk(const void *buf, __u32 first_len, __u64 n,
					     const struct iovec *iovs, __u64 niov)
{
	__u8 tail[8] = {};
	const __u8 *end = NULL;
	__u64 rem = n;

	if (!buf || n < 5)
		return false;
	if (first_len >= n) {
		end = (const __u8 *)buf + n;
	} else if (iovs && niov <= 8) {
		__u32 zero = 0;
		struct iovec *v = bpf_map_lookup_elem(&iov_scratch, &zero); /* not the stack */

		if (!v || bpf_probe_read_user(v, sizeof(v[0]) * (niov & 7 ? niov & 7 : 8), iovs))
			return false;
		for (int i = 0; i < 8; i++) {
			__u64 len;

			if (i >= niov)
				return false;
			len = v[i].iov_len < rem ? v[i].iov_len : rem;
			if (len == rem) {
				if (len < 5)
					return false; /* the last chunk straddles iovecs */
				end = (const __u8 *)v[i].iov_base + len;
				rem = len;
				break;
			}
			rem -= len;
		}
	}
	if (!end)
		return false;
	if (rem >= 7) {
		if (bpf_probe_read_user(tail + 1, 7, end - 7))
			return false;
		return tail[1] == '\r' && tail[2] == '\n' && tail[3] == '0' && tail[4] == '\r' &&
		       tail[5] == '\n' && tail[6] == '\r' && tail[7] == '\n';
	}
	if (n != 5 || bpf_probe_read_user(tail + 3, 5, end - 5))
		return false;
	return tail[3] == '0' && tail[4] == '\r' && tail[5] == '\n' && tail[6] == '\r' &&
	       tail[7] == '\n';
}

/* Server: count the exchange as soon as its response's last byte is written (the head said
 * how many there are, or the last chunk went out), not when the next request arrives: an
 * idle keep-alive connection would hold it back, and an event-driven server reads only when
 * a request is there. So reads need no enter hook. */
/* Global (verified once). `lens` is the call's byte count << 32 | its first segment's. */
__noinline int response_written(struct http_conn *conn, __u64 buf, __u64 lens, __u64 iovs,
				 __u64 niov)
{
	if (!conn || !conn->resp_end_at)
		return 0;
	if (conn->resp_end_at == RESP_END_CHUNKED) {
		if (!wrote_last_chunk((const void *)buf, (__u32)lens, lens >> 32,
				      (const struct iovec *)iovs, niov))
			return 0;
	} else if (conn->ex.resp_bytes < conn->resp_end_at) {
		return 0;
	}
	complete_exchange(conn);
	conn->state = HTTP_STATE_DONE;
	return 0;
}

static __always_inline bool h2_preface(const __u8 *b)
{
	return b[0] == 'P' && b[1] == 'R' && b[2] == 'I' && b[3] == ' ' && b[4] == '*' &&
	       b[5] == ' ' && b[6] == 'H' && b[7] == 'T' && b[8] == 'T' && b[9] == 'P' &&
	       b[10] == '/' && b[11] == '2' && b[12] == '.' && b[13] == '0';
}

struct h2_pending {
	__u64 key;
	__u64 buf; /* current segment */
	__u64 len; /* its length */
	__u64 off; /* shipped of it */
	__u64 remaining; /* bytes of the call not yet walked, current segment included */
	__u64 seg; /* index of the current iovec */
	__u64 iovs;
	__u64 niov;
	__u64 now;
	__u8 dir;
	__u8 _pad[7];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_pending);
} h2_scratch SEC(".maps");

/* Per-CPU hand-over to the tail-called shipper: nothing runs between the write and the call. */
static __always_inline bool h2_pend(__u64 key, __u8 dir, const void *buf, __u64 first_len,
				    const struct iovec *iovs, __u64 niov, __u64 total, __u64 now)
{
	__u32 zero = 0;
	struct h2_pending *p = bpf_map_lookup_elem(&h2_scratch, &zero);

	if (!p)
		return false;
	p->key = key;
	p->buf = (__u64)buf;
	p->len = first_len < total ? first_len : total;
	p->off = 0;
	p->remaining = total;
	p->seg = 0;
	p->iovs = (__u64)iovs;
	p->niov = niov;
	p->now = now;
	p->dir = dir;
	return true;
}

/* One chunk per call. bpf_loop has the verifier check this body, not every iteration; the
 * walk's state lives in the per-CPU scratch map (not the stack) so its values stay unknown
 * to the verifier and its states converge at once. */
static long ship_chunk(__u32 i, void *unused)
{
	__u32 zero = 0;
	struct h2_pending *p = bpf_map_lookup_elem(&h2_scratch, &zero);
	struct http_conn *conn;
	struct h2_chunk *rec;
	__u64 key, sz;

	if (!p)
		return 1;
	key = p->key;
	conn = bpf_map_lookup_elem(&http_conns, &key);
	if (!conn)
		return 1;
	if (p->off >= p->len) {
		const struct iovec *iovs = (const struct iovec *)p->iovs;
		struct iovec v;

		p->remaining -= p->len;
		p->seg += 1;
		if (!p->remaining || !iovs || p->seg >= p->niov || p->seg >= 1024)
			return 1;
		if (bpf_probe_read_user(&v, sizeof(v), &iovs[p->seg & 1023]))
			return 1;
		p->buf = (__u64)v.iov_base;
		p->len = v.iov_len < p->remaining ? v.iov_len : p->remaining;
		p->off = 0;
		if (!p->len)
			return 0;
	}
	rec = bpf_ringbuf_reserve(&h2_events, sizeof(*rec), 0);
	conn->h2_seq += 1; /* counted even when dropped: the gap shows the loss */
	if (!rec) {
		count_drop();
		return 1;
	}
	sz = p->len - p->off;
	if (sz > H2_CHUNK)
		sz = H2_CHUNK;
	barrier_var(sz);
	rec->kind = H2_RECORD_CHUNK;
	rec->tgid = bpf_get_current_pid_tgid() >> 32;
	rec->tid = (__u32)bpf_get_current_pid_tgid();
	rec->len = sz;
	rec->conn_id = conn->ex.conn_id;
	rec->ts_ns = p->now;
	rec->seq = conn->h2_seq;
	rec->dir = p->dir;
	rec->role = conn->ex.role;
	rec->flags = (conn->ex.conn_id & TLS_KEY_BIT) ? H2_FLAG_TLS : 0;
	rec->family = conn->ex.family;
	rec->lport = conn->ex.lport;
	rec->rport = conn->ex.rport;
	rec->_pad = 0;
	__builtin_memcpy(rec->laddr, conn->ex.laddr, 16);
	__builtin_memcpy(rec->raddr, conn->ex.raddr, 16);
	if (bpf_probe_read_user(rec->data, sz, (const void *)(p->buf + p->off)))
		rec->len = 0;
	p->off += sz;
	/* Out of chunks with bytes left: the parser must know it missed some. */
	if (i == H2_MAX_CHUNKS - 1 && (p->off < p->len || p->remaining > p->len))
		rec->flags |= H2_FLAG_TRUNCATED;
	bpf_ringbuf_submit(rec, wakeup_flags(&h2_events, sizeof(*rec), true));
	return 0;
}

/* Ship what one syscall (or SSL call) moved on an HTTP/2 connection: the first segment is
 * (buf, first_len); readv/writev/msg calls continue with iovs[1..]. */
static __always_inline int h2_ship(void)
{
	bpf_loop(H2_MAX_CHUNKS, ship_chunk, NULL, 0);
	return 0;
}

SEC("tp")
int http_h2_ship_tp(void *ctx)
{
	return h2_ship();
}

SEC("uprobe")
int http_h2_ship_uprobe(void *ctx)
{
	return h2_ship();
}

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__array(values, int(void *));
} h2_ship_tp SEC(".maps") = {
	.values = { [0] = (void *)&http_h2_ship_tp },
};

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__array(values, int(void *));
} h2_ship_uprobe SEC(".maps") = {
	.values = { [0] = (void *)&http_h2_ship_uprobe },
};

/* `key` is the socket address for bytes seen by syscalls, and the address with the low bit
 * set (socket structs are 8-aligned) for plaintext seen inside OpenSSL: the two views of a
 * TLS connection get separate state machines. */
/* Returns true when the bytes belong to an HTTP/2 connection: the caller then tail-calls the
 * chunk shipper, which h2_pending describes (kept out of this already large program). */
static __always_inline bool on_data(const struct sock *sk, __u64 key, __u8 dir, const void *buf,
				    __u64 n, __u32 first_len, __u64 enter_ns, __u64 exit_ns,
				    bool has_bytes, const struct iovec *iovs, __u64 niov)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct http_conn *conn = conn_for(sk, key, tgid);
	__u8 peek[24] = {};
	__u32 p = 0;
	__u64 sz;
	__u8 method = 0;
	__u16 status = 0;
	bool turned;

	if (!conn || conn->proto == HTTP_PROTO_FILTERED)
		return false;
	turned = conn->last_dir != dir;
	conn->last_dir = dir;
	if (conn->proto == HTTP_PROTO_H2)
		return has_bytes && h2_pend(key, dir, buf, first_len, iovs, niov, n, exit_ns);
	/* A stream that is not HTTP costs this lookup; it is looked at again only when the
	 * talk changes direction (a message boundary in request/response protocols). */
	if (conn->proto == HTTP_PROTO_NO && !turned)
		return false;
	if (has_bytes) {
		p = conn->partial_len & 7;
		for (int i = 0; i < 8; i++) {
			if (i >= p)
				break;
			peek[i] = conn->partial[i];
		}
		sz = first_len;
		if (sz > 16)
			sz = 16;
		barrier_var(sz);
		/* Constant offsets: the verifier rejects a variable one into the stack here. */
		switch (p) {
		case 0: bpf_probe_read_user(&peek[0], sz, buf); break;
		case 1: bpf_probe_read_user(&peek[1], sz, buf); break;
		case 2: bpf_probe_read_user(&peek[2], sz, buf); break;
		case 3: bpf_probe_read_user(&peek[3], sz, buf); break;
		case 4: bpf_probe_read_user(&peek[4], sz, buf); break;
		case 5: bpf_probe_read_user(&peek[5], sz, buf); break;
		case 6: bpf_probe_read_user(&peek[6], sz, buf); break;
		default: bpf_probe_read_user(&peek[7], sz, buf); break;
		}
		method = method_of(peek);
		status = method ? 0 : status_of(peek);
	}
	if (conn->proto != HTTP_PROTO_YES) {
		if (!method && !status && has_bytes && first_len >= 14 && h2_preface(peek)) {
			conn->proto = HTTP_PROTO_H2;
			conn->ex.role = dir == DIR_OUT ? HTTP_ROLE_CLIENT : HTTP_ROLE_SERVER;
			conn->h2_seq = 0;
			return h2_pend(key, dir, buf, first_len, iovs, niov, n, exit_ns);
		}
		if (!method && !status) {
			if (has_bytes && maybe_split_method(peek, p + first_len)) {
				__builtin_memcpy(conn->partial, peek, 8);
				conn->partial_len = (p + first_len) & 7;
				return false;
			}
			if ((key & TLS_KEY_BIT) && conn->proto == HTTP_PROTO_UNKNOWN) {
				/* TLS plaintext that starts mid-stream (e.g. HTTP/2 opened before
				 * the agent) or is another protocol: counted, never guessed. */
				__u32 zero = 0;
				__u64 *n_unrec = bpf_map_lookup_elem(&tls_unrecognized, &zero);

				if (n_unrec)
					*n_unrec += 1;
			}
			conn->proto = HTTP_PROTO_NO;
			conn->partial_len = 0;
			return false;
		}
		conn->proto = HTTP_PROTO_YES;
		conn->ex.role = ((method && dir == DIR_IN) || (status && dir == DIR_OUT)) ?
					HTTP_ROLE_SERVER :
					HTTP_ROLE_CLIENT;
		conn->state = HTTP_STATE_IDLE;
		if (conn->ex.role == HTTP_ROLE_CLIENT)
			remember_client(&conn->ex);
	}
	if (!method && !status && has_bytes && conn->state != HTTP_STATE_REQUEST &&
	    maybe_split_method(peek, p + first_len)) {
		__builtin_memcpy(conn->partial, peek, 8);
		conn->partial_len = (p + first_len) & 7;
		return false;
	}

	if (conn->ex.role == HTTP_ROLE_SERVER) {
		if (dir == DIR_IN) {
			/* A response of unknown length (close-delimited, or its end not seen) ends
			 * when the next request arrives. */
			if (conn->state == HTTP_STATE_RESPONSE)
				complete_exchange(conn);
			if (conn->state == HTTP_STATE_RESPONSE || conn->state == HTTP_STATE_DONE)
				conn->state = HTTP_STATE_IDLE;
			if (conn->state == HTTP_STATE_IDLE) {
				if (!method) {
					conn->partial_len = 0;
					return false; /* bytes of an exchange begun before we looked */
				}
				new_exchange(conn, method, exit_ns, n + p, tgid);
				start_message(conn, conn->ex.req_head, &conn->ex.req_head_len, buf,
					      first_len);
			} else {
				conn->ex.req_bytes += n;
				head_append(conn->ex.req_head, &conn->ex.req_head_len, buf, first_len);
			}
			return false;
		}
		if (status >= 100 && status < 200)
			return false; /* interim (100 Continue): the final response follows */
		if (status) {
			if (conn->state == HTTP_STATE_REQUEST) {
				conn->state = HTTP_STATE_RESPONSE;
				response_started(conn, status, exit_ns, buf, n, first_len);
				response_written(conn, has_bytes ? (__u64)buf : 0,
						 n << 32 | first_len, (__u64)iovs, niov);
			} else if (conn->state == HTTP_STATE_RESPONSE ||
				   conn->state == HTTP_STATE_DONE) {
				/* Next pipelined request answered: its line is further in the head. */
				if (conn->state == HTTP_STATE_RESPONSE)
					complete_exchange(conn);
				conn->state = HTTP_STATE_RESPONSE;
				conn->ex.pipe_idx += 1;
				conn->ex.flags |= HTTP_FLAG_PIPELINED;
				conn->ex.method = 0;
				conn->ex.req_bytes = 0;
				response_started(conn, status, exit_ns, buf, n, first_len);
			}
			return false;
		}
		if (conn->state == HTTP_STATE_RESPONSE) {
			conn->ex.resp_bytes += n;
			conn->ex.end_ns = exit_ns;
			response_written(conn, has_bytes ? (__u64)buf : 0, n << 32 | first_len,
					 (__u64)iovs, niov);
		}
		return false;
	}

	/* Client. */
	if (dir == DIR_OUT) {
		if (method && conn->state == HTTP_STATE_REQUEST) {
			conn->outstanding += 1; /* pipelined */
			conn->ex.req_bytes += n;
			head_append(conn->ex.req_head, &conn->ex.req_head_len, buf, first_len);
		} else if (method) {
			new_exchange(conn, method, enter_ns, n + p, tgid);
			conn->outstanding = 1;
			start_message(conn, conn->ex.req_head, &conn->ex.req_head_len, buf, first_len);
		} else if (conn->state == HTTP_STATE_REQUEST) {
			conn->ex.req_bytes += n;
		}
		return false;
	}
	if (status >= 200 && conn->state == HTTP_STATE_REQUEST) {
		response_started(conn, status, exit_ns, buf, n, first_len);
		complete_exchange(conn);
		if (conn->outstanding > 1) {
			conn->outstanding -= 1;
			conn->ex.pipe_idx += 1;
			conn->ex.flags |= HTTP_FLAG_PIPELINED;
			conn->ex.method = 0;
			conn->ex.req_bytes = 0;
		} else {
			conn->outstanding = 0;
			conn->state = HTTP_STATE_IDLE;
		}
	}
	return false;
}

/* ---- TLS: OpenSSL's SSL_read/SSL_write see the plaintext -------------------------------- */

struct tls_args {
	__u64 ssl;
	__u64 buf;
	__u64 out_len; /* SSL_*_ex: where the byte count is written; 0 for SSL_read/SSL_write */
	__u64 enter_ns;
	__u8 dir; /* 0 during a handshake: only learns which socket the SSL* uses */
	__u8 active; /* the thread is inside this SSL call */
	__u8 _pad[6];
};

/* The thread inside an SSL call; its socket syscalls tie the SSL* to a struct sock. Task
 * storage: every data syscall asks, and for a thread that never used OpenSSL the answer is
 * one pointer load (a hash lookup cost ~25 ns a syscall). */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tls_args);
} tls_calls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} tls_socks SEC(".maps");

static __always_inline bool in_tls_call(const struct sock *sk)
{
	struct tls_args *t = bpf_task_storage_get(&tls_calls, bpf_get_current_task_btf(), 0, 0);
	__u64 skp = (__u64)sk;

	if (!t || !t->active)
		return false;
	bpf_map_update_elem(&tls_socks, &t->ssl, &skp, BPF_ANY);
	return true;
}

static __always_inline int tls_enter(void *ssl, const void *buf, void *out_len, __u8 dir)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 key = (__u64)ssl;
	struct tls_args *t;
	__u64 *skp;

	if (!traced_task(tgid))
		return 0;
	t = bpf_task_storage_get(&tls_calls, bpf_get_current_task_btf(), 0,
				 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!t)
		return 0;
	t->ssl = key;
	t->buf = (__u64)buf;
	t->out_len = (__u64)out_len;
	t->enter_ns = bpf_ktime_get_ns();
	t->dir = dir;
	t->active = 1;
	skp = bpf_map_lookup_elem(&tls_socks, &key);
	if (dir == DIR_IN && skp) {
		/* As for sockets: a server reading again has finished its response. */
		__u64 ckey = *skp | TLS_KEY_BIT;
		struct http_conn *conn = bpf_map_lookup_elem(&http_conns, &ckey);

		if (conn && conn->ex.role == HTTP_ROLE_SERVER &&
		    conn->state == HTTP_STATE_RESPONSE) {
			complete_exchange(conn);
			conn->state = HTTP_STATE_IDLE;
		}
	}
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(tls_write_enter, void *ssl, const void *buf, int num)
{
	return tls_enter(ssl, buf, NULL, DIR_OUT);
}

SEC("uprobe")
int BPF_KPROBE(tls_read_enter, void *ssl, void *buf, int num)
{
	return tls_enter(ssl, buf, NULL, DIR_IN);
}

SEC("uprobe")
int BPF_KPROBE(tls_write_ex_enter, void *ssl, const void *buf, size_t num, size_t *written)
{
	return tls_enter(ssl, buf, written, DIR_OUT);
}

SEC("uprobe")
int BPF_KPROBE(tls_read_ex_enter, void *ssl, void *buf, size_t num, size_t *readbytes)
{
	return tls_enter(ssl, buf, readbytes, DIR_IN);
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
	struct tls_args *tp = bpf_task_storage_get(&tls_calls, bpf_get_current_task_btf(), 0, 0);
	struct tls_args t;
	__u64 n = 0, *skp, sk;

	if (!tp || !tp->active)
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
	if (on_data((const struct sock *)sk, sk | TLS_KEY_BIT, t.dir, (const void *)t.buf, n,
		    n > 0xffffffff ? 0xffffffff : n, t.enter_ns, bpf_ktime_get_ns(), true, NULL, 0))
		bpf_tail_call(ctx, &h2_ship_uprobe, 0);
	return 0;
}

/* ---- syscalls: the exit sees the bytes, its arguments are still in the saved registers --- */

/* What the per-syscall exit program tells the shared one it tail-calls (same CPU, nothing in
 * between). */
struct http_io {
	__u8 dir;
	__u8 io;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_io);
} http_io_scratch SEC(".maps");

static __always_inline bool pass_io(__u8 dir, __u8 io)
{
	__u32 zero = 0;
	struct http_io *p = bpf_map_lookup_elem(&http_io_scratch, &zero);

	if (!p)
		return false;
	p->dir = dir;
	p->io = io;
	return true;
}

/* True when HTTP/2 bytes wait to be shipped (the caller tail-calls the shipper). Only calls
 * that moved bytes get here. A syscall's arguments are read back from the registers saved at
 * entry (the kernel does not change them for these calls), so no enter hook has to park
 * them: one map update and delete fewer per call. The request's start is thereby the end of
 * its first write: the same instant unless that write blocked on a full send buffer. */
static __always_inline bool exit_io(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 zero = 0;
	struct http_io *pio = bpf_map_lookup_elem(&http_io_scratch, &zero);
	struct pt_regs *regs;
	struct iovec iov = {};
	struct user_msghdr msg = {};
	const void *data;
	const struct iovec *iovs = NULL;
	__u64 niov = 0, count, now;
	__u32 first_len;
	struct sock *sk;
	__u8 dir, io;

	if (!pio)
		return false;
	dir = pio->dir;
	io = pio->io;
	if (!traced_task(id >> 32))
		return false;
	regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	sk = tcp_sock_of_fd(PT_REGS_PARM1_CORE_SYSCALL(regs));
	if (!sk)
		return false;
	if (in_tls_call(sk))
		return false; /* ciphertext: the OpenSSL uprobes see this data in the clear */
	data = (const void *)PT_REGS_PARM2_CORE_SYSCALL(regs);
	count = PT_REGS_PARM3_CORE_SYSCALL(regs);
	first_len = ret;
	if (io == IO_MSG) {
		if (bpf_probe_read_user(&msg, sizeof(msg), data))
			return false;
		data = msg.msg_iov;
		count = msg.msg_iovlen;
	}
	if (io == IO_IOV || io == IO_MSG) {
		iovs = data;
		niov = count;
		if (bpf_probe_read_user(&iov, sizeof(iov), data))
			return false;
		data = iov.iov_base;
		if (iov.iov_len < first_len)
			first_len = iov.iov_len;
	}
	now = bpf_ktime_get_ns();
	return on_data(sk, (__u64)sk, dir, data, ret, first_len, now, now, io != IO_SENDFILE, iovs,
		       niov);
}

/* The exit side is the heavy part (the state machine): it lives in one program that every
 * exit tracepoint tail-calls, so the verifier checks it once instead of nine times. */
SEC("tp")
int http_exit_common(struct trace_event_raw_sys_exit *ctx)
{
	if (exit_io(ctx->ret))
		bpf_tail_call(ctx, &h2_ship_tp, 0);
	return 0;
}

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32)); /* sizes, not BTF types: prog arrays take no BTF */
	__array(values, int(void *));
} http_exit_prog SEC(".maps") = {
	.values = { [0] = (void *)&http_exit_common },
};

/* One exit tracepoint per data syscall: it fires only for that syscall, and a call that
 * moved no bytes returns at once. */
#define EXIT(name, dir, io)                                                              \
	SEC("tp/syscalls/sys_exit_" #name)                                               \
	int http_exit_##name(struct trace_event_raw_sys_exit *ctx)                       \
	{                                                                                \
		if (ctx->ret > 0 && pass_io(dir, io))                                    \
			bpf_tail_call(ctx, &http_exit_prog, 0);                          \
		return 0;                                                                \
	}

EXIT(read, DIR_IN, IO_PLAIN)
EXIT(recvfrom, DIR_IN, IO_PLAIN)
EXIT(readv, DIR_IN, IO_IOV)
EXIT(recvmsg, DIR_IN, IO_MSG)
EXIT(write, DIR_OUT, IO_PLAIN)
EXIT(sendto, DIR_OUT, IO_PLAIN)
EXIT(writev, DIR_OUT, IO_IOV)
EXIT(sendmsg, DIR_OUT, IO_MSG)
EXIT(sendfile64, DIR_OUT, IO_SENDFILE)

static __always_inline void finish_conn(__u64 key)
{
	struct http_conn *conn = bpf_map_lookup_elem(&http_conns, &key);

	if (!conn)
		return;
	if (conn->proto == HTTP_PROTO_YES && conn->state != HTTP_STATE_IDLE &&
	    conn->state != HTTP_STATE_DONE) {
		if (conn->state == HTTP_STATE_REQUEST) {
			conn->ex.flags |= HTTP_FLAG_ABORTED;
			conn->ex.status = 0;
			conn->ex.end_ns = bpf_ktime_get_ns();
		}
		complete_exchange(conn);
	}
	bpf_map_delete_elem(&http_conns, &key);
}

/* close(): a request with no response yet was aborted; a finished response is emitted. */
SEC("tp/syscalls/sys_enter_close")
int http_close(struct trace_event_raw_sys_enter *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct sock *sk;
	__u64 key;

	if (tgid == self_tgid)
		return 0;
	sk = tcp_sock_of_fd(ctx->args[0]);
	if (!sk)
		return 0;
	key = (__u64)sk;
	finish_conn(key);
	finish_conn(key | TLS_KEY_BIT);
	return 0;
}

/* A socket that closes without a close() from its process (it exited or was killed, and the
 * kernel closed its files; or a reset) still ends its exchange: a client's request left
 * without an answer is counted as aborted. A server's request is left to the server: it may
 * still answer on the socket it holds (a client that sent its request and went), as its
 * access log will say. Runs on every TCP state change and acts on the last; a close() has
 * ended the exchange before it. */
static __always_inline void sock_closed_key(__u64 key)
{
	struct http_conn *conn = bpf_map_lookup_elem(&http_conns, &key);

	if (conn && !(conn->ex.role == HTTP_ROLE_SERVER && conn->state == HTTP_STATE_REQUEST))
		finish_conn(key);
}

static __always_inline int sock_closed(__u64 key)
{
	sock_closed_key(key);
	sock_closed_key(key | TLS_KEY_BIT);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(http_sock_close_btf, const struct sock *sk, int oldstate, int newstate)
{
	__u64 key = 0;

	if (newstate != TCP_CLOSE)
		return 0;
	/* As a number: a kernel pointer may not be masked or used as map key bytes. */
	bpf_probe_read_kernel(&key, sizeof(key), &sk);
	return sock_closed(key);
}

SEC("tp/sock/inet_sock_set_state")
int http_sock_close_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->newstate != TCP_CLOSE)
		return 0;
	return sock_closed((__u64)ctx->skaddr);
}
