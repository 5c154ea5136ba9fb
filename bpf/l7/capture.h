/* The L7 capture layer: socket I/O -> per-connection data, for every protocol.
 *
 * Sources: the exit tracepoints of the data syscalls (TCP and UDP sockets), and OpenSSL's
 * SSL_read/SSL_write, whose uprobes see TLS plaintext. Each call becomes an l7_event (per-CPU
 * scratch): which connection (l7_conns, keyed by struct sock, LRU), which direction, where its
 * bytes are. A connection's protocol is classified from the first bytes of its calls in each
 * direction (bounded tries, at the points where the talk turns), then every call on it is
 * handed to that protocol's parser by a tail call through a PROG_ARRAY indexed by protocol id
 * (dispatch.h). A parser either finishes exchanges in the kernel (HTTP/1.x: one record per
 * exchange, or a count in l7_aggs) or ships the connection's bytes (l7_data records) for a
 * user-space parser (l7/protocols/<name>.py).
 *
 * This header is the layer's machinery; dispatch.h wires the protocols listed in l7.bpf.c. */
#pragma once

#include "common.h"
#include <bpf/bpf_endian.h>
#include "l7.h"
#include "bounded.h"

/* bench/l7_stages.py builds the object with L7_STAGE=n: the capture path returns after stage n
 * (L7_STAGE_* below), so each stage's share of a run's cost can be measured under load. Unset
 * (the agent's build): the whole path. */
#define L7_STAGE_EXIT 1 /* the per-syscall exit program, no tail call */
#define L7_STAGE_FILTER 2 /* the capture program's pid filter */
#define L7_STAGE_SOCK 3 /* pt_regs and fd -> socket */
#define L7_STAGE_TLS 4 /* the in-an-SSL-call check */
#define L7_STAGE_CONN 5 /* the connection's lookup */
#define L7_STAGE_STATE 6 /* the parser's tail call and its state lookup */
#define L7_STAGE_PARSE 7 /* HTTP: the state machine, heads copied; no response bounds, nothing counted */
#define L7_STAGE_BOUNDS 8 /* HTTP: + the response head's bounds (where the response ends) */
#define L7_STAGE_HASH 9 /* HTTP: + at an exchange's end, its peer and path hash */
#ifndef L7_STAGE
#define L7_STAGE 99
#endif

/* Load-time settings: the agent's own pid (its /metrics traffic is not the host's), and which
 * protocols are classified at all (bit per enum l7_proto; a protocol switched off in the
 * config is never claimed, so its connections cost what any unclassified one costs). */
const volatile __u32 self_tgid = 0;
const volatile __u32 enabled_protocols = ~0U;

#define IO_PLAIN 0
#define IO_IOV 1
#define IO_MSG 2
#define IO_SENDFILE 3
#define IO_MMSG 4
#define S_IFMT_ 00170000
#define S_IFSOCK_ 0140000
/* Connections are keyed by their struct sock's address; TLS plaintext seen inside OpenSSL by
 * the same address with the low bit set (socket structs are 8-aligned): the two views of one
 * TLS connection are two connections here, the ciphertext one never classified. */
#define TLS_KEY_BIT 1ULL
#define L7_MAX_MMSG 8

static __always_inline bool traced_task(__u32 tgid)
{
	return tgid != self_tgid && is_traced_task(tgid, 0, 0);
}

/* A connection: its identity (the header every record of it starts with) and what the capture
 * layer keeps while classifying it. Protocol state lives in each protocol's own map. */
struct l7_conn {
	struct l7_header h; /* h.proto: enum l7_proto, 0 while classifying */
	__u8 tries[2]; /* classification calls made in each direction */
	__u8 last_dir;
	__u8 partial_len; /* bytes of a split first message kept in `partial` */
	/* l7_data records shipped on this connection, per direction (seq[0]: in, seq[1]: out).
	 * A reader and a writer thread of one connection run their calls at once on two CPUs:
	 * one counter, read at the start of a call's walk and written back at its end, gave two
	 * records the same number (a gap to user space, the connection given up as if a record
	 * had been dropped). Calls in one direction are serialized by the application. */
	__u32 seq[2];
	__u8 partial[8];
};

static __always_inline __u32 *conn_seq(struct l7_conn *c, __u8 dir)
{
	return &c->seq[dir == L7_DIR_IN ? 0 : 1];
}

/* LRU: a close we never see (the process exited, the agent started after it) must not leak.
 * Entries are small (80 bytes): the table is large, because a long-lived connection pushed out
 * by a churn of short ones would come back mid-stream, where only HTTP/1.x can pick it up. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct l7_conn);
} l7_conns SEC(".maps");

/* One call, as the capture program hands it to the parser it tail-calls (same CPU, nothing
 * runs in between). Of `h`, the capture program fills proto, role, tgid and tid (the calling
 * process and thread); the rest is the connection's identity, which a parser that needs it
 * copies in with l7_event_identity. */
struct l7_event {
	struct l7_header h;
	__u64 key; /* l7_conns key */
	__u64 buf; /* the first segment's bytes (0 when the call's bytes are not in memory) */
	__u64 first_len; /* bytes in the first segment */
	__u64 total; /* bytes the call moved */
	__u64 iovs; /* readv/writev/msg: the iovec array (segment 0 is buf); mmsg: the mmsghdrs */
	__u64 niov; /* iovecs; mmsg: messages */
	__u64 enter_ns;
	__u64 exit_ns;
	__u8 dir; /* enum l7_dir */
	__u8 io; /* IO_* */
	__u8 transport; /* enum l7_transport */
	__u8 classified; /* this call classified the connection: `peek` holds its first bytes */
	__u16 peer_port; /* UDP: the datagram's peer when the call named one (else 0) */
	__u8 peer_family;
	__u8 partial_len; /* classified: bytes at the start of `peek` kept from earlier calls */
	__u8 peer_addr[16];
	struct l7_peek peek;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_event);
} l7_ev SEC(".maps");

static __always_inline struct l7_event *l7_event(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&l7_ev, &zero);
}

/* The connection's whole identity into the event's header, keeping the caller's ids. */
static __always_inline void l7_event_identity(struct l7_event *ev, const struct l7_conn *c)
{
	__u32 tgid = ev->h.tgid, tid = ev->h.tid;

	__builtin_memcpy(&ev->h, &c->h, sizeof(ev->h));
	ev->h.tgid = tgid;
	ev->h.tid = tid;
}

/* l7_data records of every protocol that parses in user space: variable length (a record is
 * as long as its bytes), so the reader walks it record by record. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} l7_data SEC(".maps");

/* probewire_l7_connections_total and friends (enum l7_coverage), per protocol, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, L7_PROTO_COUNT * L7_COV_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} l7_coverage SEC(".maps");

static __always_inline void coverage_add(__u32 proto, __u32 counter)
{
	__u32 idx = proto * L7_COV_COUNT + counter;
	__u64 *n;

	if (idx >= L7_PROTO_COUNT * L7_COV_COUNT)
		return;
	n = bpf_map_lookup_elem(&l7_coverage, &idx);
	if (n)
		*n += 1;
}

struct l7_data *btf_export_l7_data __attribute__((unused));
struct l7_header *btf_export_l7_header __attribute__((unused));
struct l7_peek *btf_export_l7_peek __attribute__((unused));
enum l7_proto btf_export_l7_proto __attribute__((unused));
enum l7_role btf_export_l7_role __attribute__((unused));
enum l7_dir btf_export_l7_dir __attribute__((unused));
enum l7_transport btf_export_l7_transport __attribute__((unused));
enum l7_record btf_export_l7_record __attribute__((unused));
enum l7_flag btf_export_l7_flag __attribute__((unused));
enum l7_coverage btf_export_l7_coverage __attribute__((unused));
enum l7_limit btf_export_l7_limit __attribute__((unused));
enum l7_data_limit btf_export_l7_data_limit __attribute__((unused));

/* ---- sockets -------------------------------------------------------------------------------- */

/* The 8 bytes of kernel memory at `addr`, as a number, by one plain load (KFUNCS only): a
 * pointer the verifier must not know as one (an fd table slot, a variable index into an array
 * of pointers; the sock's address, hashed and masked as a map key) without a
 * bpf_probe_read_kernel call, which cost more than the rest of the fd -> socket walk. The cast
 * is to a struct whose first member is a plain 64-bit integer; a fault reads 0. */
static __always_inline __u64 kword(__u64 addr)
{
	return CAST(struct timespec64, addr)->tv_sec;
}

/* Runs for every data syscall of a traced process: fd -> struct sock of a TCP or UDP socket
 * (IPv4/IPv6), else NULL. */
static __always_inline struct sock *sock_of_fd(int fd, __u8 *transport)
{
#ifdef L7_BOUNDED /* no bpf_get_current_task_btf (5.11): the same fields by probe reads */
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	unsigned int max_fds = BPF_CORE_READ(fdt, max_fds);
	struct file **fds = BPF_CORE_READ(fdt, fd);
#else
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = task->files->fdt;
#endif
	struct file *file = NULL;
	struct socket *sock;
	struct sock *sk;
	__u16 family, protocol;

#ifdef L7_BOUNDED
	if (fd < 0 || (unsigned int)fd >= max_fds)
		return NULL;
#else
	if (fd < 0 || (unsigned int)fd >= fdt->max_fds)
		return NULL;
#endif
	/* The bounded object's fd table is a plain pointer (no bpf_get_current_task_btf): probe
	 * reads only (bpf_rdonly_cast, 6.2, never meets a kernel that needs that object anyway). */
	if (KFUNCS && !L7_IS_BOUNDED) {
		const struct sock *s;
		struct file *f;

		/* fdt->fd and private_data are not pointers to structs: the verifier gives
		 * their values as numbers. */
		f = CAST(struct file, kword((__u64)&fdt->fd[fd]));
		if (!f || (f->f_inode->i_mode & S_IFMT_) != S_IFSOCK_)
			return NULL;
		sk = (struct sock *)kword((__u64)f->private_data +
					  bpf_core_field_offset(struct socket, sk));
		if (!sk)
			return NULL;
		s = CAST(struct sock, sk);
		protocol = s->sk_protocol;
		family = s->__sk_common.skc_family;
	} else {
#ifdef L7_BOUNDED
		if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
			return NULL;
#else
		if (bpf_probe_read_kernel(&file, sizeof(file), &fdt->fd[fd]) || !file)
			return NULL;
#endif
		if ((BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT_) != S_IFSOCK_)
			return NULL;
		sock = BPF_CORE_READ(file, private_data);
		sk = BPF_CORE_READ(sock, sk);
		if (!sk)
			return NULL;
		protocol = BPF_CORE_READ(sk, sk_protocol);
		family = BPF_CORE_READ(sk, __sk_common.skc_family);
	}
	if ((protocol != IPPROTO_TCP && protocol != IPPROTO_UDP) ||
	    (family != AF_INET && family != AF_INET6))
		return NULL;
	*transport = protocol;
	return sk;
}

static __always_inline void fill_identity(struct l7_header *h, const struct sock *sk)
{
	h->family = KREAD(struct sock, sk, __sk_common.skc_family);
	h->lport = KREAD(struct sock, sk, __sk_common.skc_num);
	h->rport = bpf_ntohs(KREAD(struct sock, sk, __sk_common.skc_dport));
	if (h->family == AF_INET) {
		KCOPY(h->laddr, 4, struct sock, sk, __sk_common.skc_rcv_saddr);
		KCOPY(h->raddr, 4, struct sock, sk, __sk_common.skc_daddr);
	} else {
		KCOPY(h->laddr, 16, struct sock, sk, __sk_common.skc_v6_rcv_saddr);
		KCOPY(h->raddr, 16, struct sock, sk, __sk_common.skc_v6_daddr);
	}
}

/* ---- local peers: the process at the other end of a connection on this host ----------------- */

/* Local end of each classified client connection -> its process. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct l7_endpoint);
	__type(value, __u32);
} l7_clients SEC(".maps");

struct l7_endpoint *btf_export_l7_endpoint __attribute__((unused));

static __always_inline void remember_client(const struct l7_header *h)
{
	struct l7_endpoint ep = {};
	__u32 tgid = h->tgid;

	__builtin_memcpy(ep.addr, h->laddr, 16);
	ep.port = h->lport;
	ep.family = h->family;
	bpf_map_update_elem(&l7_clients, &ep, &tgid, BPF_ANY);
}

/* Server side: the process at the other end when it is a client on this host. Asked until
 * found: the client's own hook may run after the server has read. */
static __always_inline void find_peer(struct l7_header *h)
{
	struct l7_endpoint ep = {};
	__u32 *tgid;

	if (h->role != L7_ROLE_SERVER || h->peer_tgid)
		return;
	__builtin_memcpy(ep.addr, h->raddr, 16);
	ep.port = h->rport;
	ep.family = h->family;
	tgid = bpf_map_lookup_elem(&l7_clients, &ep);
	if (tgid)
		h->peer_tgid = *tgid;
}

/* ---- kernel aggregation, for any protocol (see l7.h) ---------------------------------------- */

/* Bucket boundaries are user space's (the exported ones), set before load. */
const volatile __u64 duration_bounds_ns[L7_DURATION_BOUNDS] = {
	5000000, 10000000, 25000000, 50000000, 75000000, 100000000, 250000000,
	500000000, 750000000, 1000000000, 2500000000, 5000000000, 7500000000, 10000000000,
};
const volatile __u64 size_bounds[L7_SIZE_BOUNDS] = {
	0, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
};
/* Off when every exchange must reach user space (spans for every exchange). */
const volatile __u8 aggregate = 1;

struct l7_op_key {
	__u64 hash; /* of the bytes that name the operation, as the protocol computes it */
	__u32 proto;
	__u32 _pad;
};

/* Operation hash -> user space's operation id, written when user space has named an
 * operation from a shipped exchange. LRU: one forgotten is learnt again from its next record. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct l7_op_key);
	__type(value, __u32);
} l7_ops SEC(".maps");

/* Exchanges counted per label-ish key, per CPU. Entries are never deleted while their process
 * lives (user space adds each key's growth), so no count is lost to a race; a full map sends
 * the exchange through the ring instead. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l7_agg_key);
	__type(value, struct l7_agg);
} l7_aggs SEC(".maps");

/* The key is built in map memory: parsers' call chains are deep, and 512 bytes of stack are
 * all a program gets across its frames. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_agg_key);
} l7_agg_scratch SEC(".maps");

static const struct l7_agg zero_agg;
struct l7_agg_key *btf_export_l7_agg_key __attribute__((unused));
struct l7_agg *btf_export_l7_agg __attribute__((unused));
struct l7_op_key *btf_export_l7_op_key __attribute__((unused));

static __always_inline __u32 duration_bucket(__u64 v)
{
	__u32 idx = 0;

	for (int i = 0; i < L7_DURATION_BOUNDS; i++)
		idx += duration_bounds_ns[i] < v;
	return idx;
}

static __always_inline __u32 size_bucket(__u64 v)
{
	__u32 idx = 0;

	for (int i = 0; i < L7_SIZE_BOUNDS; i++)
		idx += size_bounds[i] < v;
	return idx;
}

/* The operation id user space gave this hash, or NULL (then the exchange teaches it). */
static __always_inline __u32 *l7_op(__u32 proto, __u64 hash)
{
	struct l7_op_key k = { .hash = hash, .proto = proto };

	return bpf_map_lookup_elem(&l7_ops, &k);
}

/* A zeroed aggregation key in map memory, its connection fields filled from `h`. */
static __always_inline struct l7_agg_key *l7_agg_key_for(const struct l7_header *h)
{
	__u32 zero = 0;
	struct l7_agg_key *key = bpf_map_lookup_elem(&l7_agg_scratch, &zero);

	if (!key)
		return NULL;
	__builtin_memset(key, 0, sizeof(*key));
	key->tgid = h->tgid;
	key->proto = h->proto;
	key->role = h->role;
	key->flags = h->flags & L7_FLAG_TLS;
	key->family = h->family;
	__builtin_memcpy(key->raddr, h->raddr, 16);
	if (h->role == L7_ROLE_SERVER) {
		key->peer_tgid = h->peer_tgid;
		key->lport = h->lport;
		__builtin_memcpy(key->laddr, h->laddr, 16);
	} else {
		key->rport = h->rport;
	}
	return key;
}

/* Count one exchange under `key`. req_body < 0: the request's size is not known; resp_body <
 * 0: no response size is counted (client side). Returns false when the map is full (the
 * caller ships the exchange instead). */
static __noinline bool l7_agg_add(const struct l7_agg_key *key, __u64 duration,
				   __s64 req_body, __s64 resp_body)
{
	struct l7_agg *agg = bpf_map_lookup_elem(&l7_aggs, key);

	if (!agg) {
		bpf_map_update_elem(&l7_aggs, key, &zero_agg, BPF_NOEXIST);
		agg = bpf_map_lookup_elem(&l7_aggs, key);
		if (!agg)
			return false;
	}
	agg->count += 1;
	agg->duration_ns += duration;
	agg->duration[duration_bucket(duration) & 15] += 1;
	if (req_body >= 0) {
		agg->req_body_count += 1;
		agg->req_body_bytes += req_body;
		agg->req_body[size_bucket(req_body) & 15] += 1;
	}
	if (resp_body >= 0) {
		agg->resp_body_bytes += resp_body;
		agg->resp_body[size_bucket(resp_body) & 15] += 1;
	}
	return true;
}

/* ---- shipping bytes to a user-space parser ---------------------------------------------------- */

/* A record being built: the fixed part, then up to L7_CHUNK bytes. The data area is twice
 * that, so that a piece of at most L7_CHUNK bytes copied at an offset below L7_CHUNK is in
 * bounds whatever the verifier knows of the two (per-CPU values are at most 32 KiB). */
struct l7_data_buf {
	struct l7_data d;
	__u8 data[2 * L7_CHUNK];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_data_buf);
} l7_data_scratch SEC(".maps");

/* The walk of one call's bytes, in map memory so its values stay unknown to the verifier
 * and bpf_loop's callback converges at once. */
struct l7_walk {
	__u64 buf; /* current segment (iovec) */
	__u64 len; /* its length */
	__u64 off; /* taken of it */
	__u64 remaining; /* bytes of the call not yet taken */
	__u64 seg; /* index of the current iovec / message */
	__u64 iovs;
	__u64 niov;
	__u32 fill; /* bytes in the record being built */
	__u32 records; /* records shipped for this call */
	__u32 seq;
	__u32 _pad;
	__u64 skip; /* bytes passed over uncopied before the call's tail (see L7_TAIL) */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_walk);
} l7_walk_scratch SEC(".maps");

/* A sockaddr in user memory -> the datagram peer in `ev` (family 0 when there is none). */
static __always_inline void read_peer(struct l7_event *ev, const void *addr)
{
	struct sockaddr_in6 sa = {};

	ev->peer_family = 0;
	if (!addr || bpf_probe_read_user(&sa, sizeof(sa), addr))
		return;
	if (sa.sin6_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)&sa;

		ev->peer_family = AF_INET;
		ev->peer_port = bpf_ntohs(in->sin_port);
		__builtin_memset(ev->peer_addr, 0, 16);
		__builtin_memcpy(ev->peer_addr, &in->sin_addr, 4);
	} else if (sa.sin6_family == AF_INET6) {
		ev->peer_family = AF_INET6;
		ev->peer_port = bpf_ntohs(sa.sin6_port);
		__builtin_memcpy(ev->peer_addr, &sa.sin6_addr, 16);
	}
}

/* Ship the record in the scratch buffer: the connection's identity `h`, the `len` data bytes
 * already in it, then `skipped` bytes the call moved that are not in it. `ev` (may be NULL)
 * gives the direction, time and, for a datagram, its peer. */
static __always_inline void emit_built(const struct l7_header *h, const struct l7_event *ev,
				       __u16 kind, __u64 len, __u64 skipped, __u32 seq)
{
	__u32 zero = 0;
	struct l7_data_buf *b = bpf_map_lookup_elem(&l7_data_scratch, &zero);

	if (!b)
		return;
	__builtin_memcpy(&b->d, h, sizeof(*h));
	b->d.kind = kind;
	b->d.tid = (__u32)bpf_get_current_pid_tgid();
	b->d.seq = seq;
	b->d._pad[0] = b->d._pad[1] = b->d._pad[2] = 0;
	b->d.skipped = skipped > 0xffffffff ? 0xffffffff : skipped;
	if (ev) {
		b->d.ts_ns = ev->exit_ns;
		b->d.dir = ev->dir;
		if (ev->peer_family) {
			b->d.family = ev->peer_family;
			b->d.rport = ev->peer_port;
			__builtin_memcpy(b->d.raddr, ev->peer_addr, 16);
		}
	} else {
		b->d.ts_ns = bpf_ktime_get_ns();
		b->d.dir = 0;
	}
	if (len > L7_CHUNK)
		len = L7_CHUNK;
	b->d.len = len;
	barrier_var(len);
	if (len > L7_CHUNK)
		return;
	/* Records vary in size: the wake-up policy counts them as if each were of a typical size
	 * (a wake-up a little early or late, never a record lost). */
	if (bpf_ringbuf_output(&l7_data, b, sizeof(b->d) + len,
			       wakeup_flags(&l7_data, sizeof(b->d) + 64, false)))
		count_drop();
}

/* One record of `sz` bytes from user memory at `src` (a datagram; none for a close). */
static __always_inline void emit(const struct l7_header *h, const struct l7_event *ev,
				 __u16 kind, __u64 src, __u64 sz, __u64 skipped, __u32 seq)
{
	__u32 zero = 0;
	struct l7_data_buf *b = bpf_map_lookup_elem(&l7_data_scratch, &zero);

	if (!b)
		return;
	if (sz > L7_CHUNK)
		sz = L7_CHUNK;
	barrier_var(sz);
	if (src && sz && sz <= L7_CHUNK && bpf_probe_read_user(b->data, sz, (const void *)src))
		sz = 0;
	emit_built(h, ev, kind, src ? sz : 0, skipped, seq);
}

/* A call too long to ship whole (L7_MAX_CHUNKS records) still ships its last bytes: protocols
 * end a message there after a counted body (memcached's "END\r\n" after a value), and a parser
 * that stepped over the body needs them to complete the exchange. */
#define L7_TAIL 512

/* Bytes of one call a walk may take in pieces (iovecs, or parts of them at record ends). */
#define L7_MAX_PIECES 256
/* The same without bpf_loop (l7_bounded): each piece is verified again, so fewer; a call
 * with more pieces ships what they took and counts as truncated. */
#define L7_BOUNDED_PIECES 48
/* Records a walk fills before it passes over the middle of a call. l7_bounded passes over it
 * sooner (24 records, 192 KiB), so the skip and the tail still fit in its pieces with room for
 * iovec steps (a piece to load each iovec, one to pass over each, one to copy from each): a
 * 1 MB memcached set and a two-value 400 KiB reply then still end with their tails, as on
 * other kernels. */
#ifdef L7_BOUNDED
#define L7_WALK_CHUNKS (L7_BOUNDED_PIECES - 24)
#else
#define L7_WALK_CHUNKS L7_MAX_CHUNKS
#endif

/* One piece of a stream call a callback: the bytes of the current iovec that fit in the
 * record being built. A record is shipped when full or when the call's bytes end; iovecs are
 * gathered into records (gRPC writes a frame in many small slices). Past L7_WALK_CHUNKS records
 * the middle of the call is passed over: the last full record says how many bytes follow it
 * uncopied (`skipped`, so a parser inside a message of known length steps over them), and one
 * more record carries the call's last L7_TAIL bytes. */
static long ship_piece(__u32 i, void *unused)
{
	__u32 zero = 0;
	struct l7_walk *w = bpf_map_lookup_elem(&l7_walk_scratch, &zero);
	struct l7_data_buf *b = bpf_map_lookup_elem(&l7_data_scratch, &zero);
	struct l7_event *ev = l7_event();
	__u64 take, fill;

	if (!w || !b || !ev)
		return 1;
	if (w->off >= w->len) {
		const struct iovec *iovs = (const struct iovec *)w->iovs;
		struct iovec v;

		w->seg += 1;
		if (!w->remaining || !iovs || w->seg >= w->niov || w->seg >= 1024)
			return 1;
		if (bpf_probe_read_user(&v, sizeof(v), &iovs[w->seg & 1023]))
			return 1;
		w->buf = (__u64)v.iov_base;
		w->len = v.iov_len;
		w->off = 0;
		return 0;
	}
	if (w->skip) {
		take = w->len - w->off;
		if (take > w->skip)
			take = w->skip;
		w->off += take;
		w->skip -= take;
		return 0;
	}
	fill = w->fill & (L7_CHUNK - 1);
	take = w->len - w->off;
	if (take > w->remaining)
		take = w->remaining;
	if (take > L7_CHUNK - fill)
		take = L7_CHUNK - fill;
	barrier_var(take);
	if (take > L7_CHUNK)
		return 1;
	if (take && bpf_probe_read_user(b->data + fill, take, (const void *)(w->buf + w->off)))
		__builtin_memset(b->data, 0, 8); /* unreadable: the record's bytes are what they are */
	w->off += take;
	w->remaining -= take;
	w->fill = fill + take;
	if (w->fill < L7_CHUNK && w->remaining)
		return 0;
	w->records += 1;
	w->seq += 1; /* counted even when dropped: the gap shows the loss */
	if (w->records >= L7_WALK_CHUNKS && w->remaining > L7_TAIL) {
		emit_built(&ev->h, ev, L7_RECORD_DATA, w->fill, w->remaining - L7_TAIL, w->seq);
		coverage_add(ev->h.proto, L7_COV_TRUNCATED);
		w->fill = 0;
		w->skip = w->remaining - L7_TAIL;
		w->remaining = L7_TAIL;
		return 0;
	}
	emit_built(&ev->h, ev, L7_RECORD_DATA, w->fill, 0, w->seq);
	w->fill = 0;
	return !w->remaining;
}

/* One datagram of a sendmmsg/recvmmsg call a callback. */
static long ship_message(__u32 i, void *unused)
{
	__u32 zero = 0;
	struct l7_walk *w = bpf_map_lookup_elem(&l7_walk_scratch, &zero);
	struct l7_event *ev = l7_event();
	struct mmsghdr m = {};
	struct iovec v = {};
	__u64 sz;

	if (!w || !ev || i >= w->niov || i >= L7_MAX_MMSG)
		return 1;
	if (bpf_probe_read_user(&m, sizeof(m), &((const struct mmsghdr *)w->iovs)[i & 7]))
		return 1;
	if (m.msg_hdr.msg_iovlen < 1 || bpf_probe_read_user(&v, sizeof(v), m.msg_hdr.msg_iov))
		return 1;
	read_peer(ev, m.msg_hdr.msg_name);
	sz = m.msg_len < v.iov_len ? m.msg_len : v.iov_len;
	if (sz > L7_CHUNK)
		sz = L7_CHUNK;
	w->seq += 1;
	emit(&ev->h, ev, L7_RECORD_DATA, (__u64)v.iov_base, sz, m.msg_len - sz, w->seq);
	return 0;
}

L7_BOUNDED_STEP(ship_piece)
L7_BOUNDED_STEP(ship_message)

/* A walk over the call's bytes from its first segment (l7_ship_data, the HTTP/2 frame walk). */
static __always_inline void l7_walk_start(struct l7_walk *w, const struct l7_event *ev)
{
	w->buf = ev->buf;
	w->len = ev->first_len;
	w->off = 0;
	w->remaining = ev->total;
	w->seg = 0;
	w->iovs = ev->iovs;
	w->niov = ev->niov;
	w->fill = 0;
	w->records = 0;
	w->skip = 0;
}

/* The parser of every protocol parsed in user space: ship what the call moved, in order, with
 * the connection's sequence numbers. A call whose bytes are not in memory (sendfile) ships a
 * record of no bytes and all of them skipped. */
static __always_inline int l7_ship_data(void *ctx, struct l7_event *ev)
{
	__u32 zero = 0;
	struct l7_walk *w = bpf_map_lookup_elem(&l7_walk_scratch, &zero);
	struct l7_conn *c = bpf_map_lookup_elem(&l7_conns, &ev->key);

	if (!w || !c)
		return 0;
	if (ev->dir == L7_DIR_IN)
		find_peer(&c->h);
	l7_event_identity(ev, c);
	w->seq = *conn_seq(c, ev->dir);
	if (ev->io == IO_MMSG) {
		w->iovs = ev->iovs;
		w->niov = ev->niov;
		L7_LOOP(L7_MAX_MMSG, L7_MAX_MMSG, ship_message, NULL);
	} else if (!ev->buf) {
		w->seq += 1;
		emit(&ev->h, ev, L7_RECORD_DATA, 0, 0, ev->total, w->seq);
	} else {
		l7_walk_start(w, ev);
		if (ev->transport == L7_UDP) /* a datagram: its first segment is all there is */
			w->remaining = w->len < ev->total ? w->len : ev->total;
		L7_LOOP(L7_MAX_PIECES, L7_BOUNDED_PIECES, ship_piece, NULL);
		if (w->fill || w->remaining) { /* out of pieces (more iovecs than the walk takes) */
			w->seq += 1;
			emit_built(&ev->h, ev, L7_RECORD_DATA, w->fill, w->skip + w->remaining,
				   w->seq);
			if (w->remaining)
				coverage_add(ev->h.proto, L7_COV_TRUNCATED);
		}
	}
	/* Looked up again: the verifier does not carry the pointer across bpf_loop. */
	c = bpf_map_lookup_elem(&l7_conns, &ev->key);
	if (c)
		*conn_seq(c, ev->dir) = w->seq;
	return 0;
}

/* A connection parsed in user space ended: one record with no bytes says so. Returns true:
 * the connection's entry goes. */
static __always_inline bool l7_close_shipped(struct l7_conn *c, __u64 key, bool close_call)
{
	/* Its number is one past all records made: 1 says the agent saw the whole connection. */
	emit(&c->h, NULL, L7_RECORD_CLOSE, 0, 0, 0, c->seq[0] + c->seq[1] + 1);
	return true;
}

/* ---- TLS: OpenSSL's SSL_read/SSL_write see the plaintext --------------------------------------- */

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
#ifdef L7_BOUNDED
/* No task storage (5.11): the same, in a hash by thread (LRU: a thread that dies inside an
 * SSL call must not leak its entry). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct tls_args);
} tls_calls SEC(".maps");

static const struct tls_args zero_tls_args;

static __always_inline struct tls_args *tls_args_of_thread(bool create)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct tls_args *t = bpf_map_lookup_elem(&tls_calls, &id);

	if (t || !create)
		return t;
	bpf_map_update_elem(&tls_calls, &id, &zero_tls_args, BPF_ANY);
	return bpf_map_lookup_elem(&tls_calls, &id);
}
#else
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tls_args);
} tls_calls SEC(".maps");

static __always_inline struct tls_args *tls_args_of_thread(bool create)
{
	return bpf_task_storage_get(&tls_calls, bpf_get_current_task_btf(), 0,
				    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}
#endif

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} tls_socks SEC(".maps");

/* A syscall made inside an SSL call moves ciphertext: it only ties the SSL* to its socket. */
static __always_inline bool in_tls_call(const struct sock *sk)
{
	struct tls_args *t = tls_args_of_thread(false);
	__u64 skp = (__u64)sk;

	if (!t || !t->active)
		return false;
	bpf_map_update_elem(&tls_socks, &t->ssl, &skp, BPF_ANY);
	return true;
}
