/* HTTP/1.x on the capture layer: exchanges decided in the kernel.
 *
 * Per connection (http_states, keyed like l7_conns) a small state machine finds message
 * starts (request line / status line at the start of a call's bytes), keeps the first bytes of
 * each head, counts bytes, and ends an exchange when its response's last byte is written (or
 * at the next request, or the close). An exchange whose path user space has templated is
 * counted in kernel maps (l7_aggs); others go to user space as one http_exchange record.
 * Method, status, role, header lengths and body sizes are decided here; path templating and
 * pipelined heads are user space's (l7/protocols/http1.py). */
#pragma once

#include "capture.h"
#include "http.h"
#include "http_parse.h"

struct http_exchange *btf_export_http_exchange __attribute__((unused));
enum http_method btf_export_http_method __attribute__((unused));
enum http_flag btf_export_http_flag __attribute__((unused));
enum http_limit btf_export_http_limit __attribute__((unused));

/* The classifier: a request line (METHOD SP target) or a status line at a call's start. */
static __always_inline __u8 http_classify(const struct l7_peek *p)
{
	if (p->transport != L7_TCP)
		return L7_ROLE_UNKNOWN;
	if (method_of(p->data))
		return p->dir == L7_DIR_IN ? L7_ROLE_SERVER : L7_ROLE_CLIENT;
	if (status_of(p->data))
		return p->dir == L7_DIR_OUT ? L7_ROLE_SERVER : L7_ROLE_CLIENT;
	return L7_ROLE_UNKNOWN;
}

/* LRU: a close we never see must not leak. An entry pushed out costs at most the exchange in
 * flight on it: the next request line starts a fresh one. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct http_state);
} http_states SEC(".maps");

static struct http_state zero_http_state;

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

/* 1: path_hash takes numeric path segments for one (user space's {id}); set by user space
 * (L7Probe) unless a configured route pattern has a numeric literal segment. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} l7_path_ids SEC(".maps");

/* A global function: the verifier checks it once, not once per completion site (its loops
 * would otherwise be walked for each of them). Returns 1 when the exchange was counted. */
L7_GLOBAL int http_aggregate(struct http_exchange *ex)
{
	__u32 zero = 0, *numeric;
	struct l7_agg_key *key;
	__u32 *op;
	__u64 duration;
	__s64 req_body = -1, resp_body = -1;
	int req_hdr, resp_hdr;

	if (!ex || !ex->method || ex->pipe_idx)
		return 0; /* user space reads the head */
	numeric = bpf_map_lookup_elem(&l7_path_ids, &zero);
	ex->path_hash = path_hash(ex->req_head, ex->req_head_len, ex->method,
				  numeric ? *numeric : 0);
	if (L7_STAGE <= L7_STAGE_HASH)
		return 1;
	op = l7_op(L7_PROTO_HTTP, ex->path_hash);
	if (!op)
		return 0; /* a new path: its record teaches user space the route */
	key = l7_agg_key_for((const struct l7_header *)ex);
	if (!key)
		return 0;
	key->op = *op;
	key->status = ex->status;
	key->method = ex->method;
	key->pflags = ex->hflags & HTTP_FLAG_ABORTED;
	duration = ex->end_ns > ex->start_ns ? ex->end_ns - ex->start_ns : 0;
	req_hdr = header_end(ex->req_head, ex->req_head_len);
	if (req_hdr >= 0)
		req_body = ex->req_bytes > (__u64)req_hdr ? ex->req_bytes - req_hdr : 0;
	if (ex->role == L7_ROLE_SERVER) {
		resp_hdr = ex->resp_header_end;
		if (resp_hdr < 0)
			resp_hdr = ex->resp_first_write;
		resp_body = ex->resp_bytes > (__u64)resp_hdr ? ex->resp_bytes - resp_hdr : 0;
	}
	return l7_agg_add(key, duration, req_body, resp_body);
}

/* Span sampling (sampling.one_in while spans are exported): each trace is kept or not here,
 * so the records of traces not kept are counted in kernel maps like those of known routes and
 * never cross to user space. A request's traceparent decides its own trace (l7_sampling's
 * honor); else a server request draws at its start (bpf_get_prandom_u32() < its bound, out of
 * 2^32) and its thread remembers the draw, so the client calls it makes while it is served
 * follow it; a client call outside a server's draws its own. The kept ones carry
 * HTTP_FLAG_SAMPLED; a record of a trace not kept still ships while its route is unknown
 * (user space learns the route from it, and makes no span). */
const volatile __u8 sample_spans = 0;

/* The draw's bound and whether traceparents decide: set (and reloaded) by user space. */
struct l7_sampling {
	__u64 bound; /* keep when bpf_get_prandom_u32() < bound (2^32: all) */
	__u8 honor; /* a request's traceparent decides its trace */
	__u8 _pad[7];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_sampling);
} l7_sampling SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* thread */
	__type(value, __u8); /* its current server request's trace is kept */
} trace_kept SEC(".maps");

L7_GLOBAL int http_sample(struct http_exchange *ex)
{
	struct l7_sampling *cfg;
	int parent = -1;
	__u32 tid, zero = 0;
	__u8 keep, *known;

	cfg = bpf_map_lookup_elem(&l7_sampling, &zero);
	if (!ex || !cfg)
		return 0;
	tid = ex->tid;
	if (cfg->honor)
		parent = traceparent_sampled(ex->req_head, ex->req_head_len);
	if (parent >= 0)
		keep = parent;
	else if (ex->role == L7_ROLE_CLIENT && (known = bpf_map_lookup_elem(&trace_kept, &tid)))
		keep = *known;
	else
		keep = (__u64)bpf_get_prandom_u32() < cfg->bound;
	if (ex->role == L7_ROLE_SERVER)
		bpf_map_update_elem(&trace_kept, &tid, &keep, BPF_ANY);
	if (keep)
		ex->hflags |= HTTP_FLAG_SAMPLED;
	return keep;
}

#ifdef L7_BOUNDED
/* Before 5.12 a global function takes no pointers: the state machine's global steps find
 * their connection's state by its key (the exchange's conn_id) and run the static function
 * above, so the verifier checks each once, not at every call site. */
__noinline int http_sample_by_key(__u64 key)
{
	struct http_state *st = bpf_map_lookup_elem(&http_states, &key);

	return st ? http_sample(&st->ex) : 0;
}
#define http_sample(ex) http_sample_by_key((ex)->conn_id)
#endif

/* An exchange is over: count it in the kernel if its route is known (and, with spans, its
 * trace not kept), else ship it. Global (verified once): it is reached from many places of
 * the state machine. */
L7_GLOBAL int http_complete(struct http_state *st)
{
	if (!st || L7_STAGE <= L7_STAGE_BOUNDS)
		return 0;
	find_peer((struct l7_header *)&st->ex);
	if (sample_spans && st->ex.role == L7_ROLE_CLIENT)
		http_sample(&st->ex);
	if (aggregate && !(st->ex.hflags & HTTP_FLAG_SAMPLED) && http_aggregate(&st->ex))
		return 0;
	if (bpf_ringbuf_output(&events, &st->ex, sizeof(st->ex),
			       wakeup_flags(&events, sizeof(st->ex), false)))
		count_drop();
	return 0;
}

#ifdef L7_BOUNDED
__noinline int http_complete_by_key(__u64 key)
{
	return http_complete(bpf_map_lookup_elem(&http_states, &key));
}
#define http_complete(st) http_complete_by_key((st)->ex.conn_id)
#endif

static __always_inline void start_message(struct http_state *st, __u8 *head, __u16 *head_len,
					  const void *buf, __u64 n)
{
	__u32 p = st->partial_len;

	*head_len = 0;
	if (p) {
		__u64 word;

		/* Whole words: a byte loop here becomes a memmove, which BPF has not. */
		__builtin_memcpy(&word, st->partial, 8);
		__builtin_memcpy(head, &word, 8);
		*head_len = p & 7;
	}
	head_append(head, head_len, buf, n);
	st->partial_len = 0;
}

static __always_inline void new_exchange(struct http_state *st, __u8 method, __u64 start_ns,
					 __u64 req_bytes, __u32 tgid)
{
	st->ex.tid = (__u32)bpf_get_current_pid_tgid();
	st->ex.method = method;
	st->ex.hflags = 0;
	st->ex.start_ns = start_ns;
	st->ex.req_bytes = req_bytes;
	st->ex.tgid = tgid;
	st->ex.status = 0;
	st->ex.pipe_idx = 0;
	st->ex.end_ns = 0;
	st->ex.resp_bytes = 0;
	st->ex.resp_head_len = 0;
	st->ex.resp_first_write = 0;
	st->ex.path_hash = 0;
	st->ex.resp_header_end = -1;
	st->state = HTTP_STATE_REQUEST;
}

/* Global (verified once): a server's response head is copied and its bounds read (its
 * header length gives the body size). A client's is not needed: its status is known. */
L7_GLOBAL int http_response_head(struct http_state *st, __u64 buf)
{
	if (!st)
		return 0;
	st->ex.resp_head_len = 0;
	st->resp_end_at = 0;
	if (st->ex.role != L7_ROLE_SERVER)
		return 0;
	head_append(st->ex.resp_head, &st->ex.resp_head_len, (const void *)buf,
		    st->ex.resp_first_write);
	if (L7_STAGE <= L7_STAGE_PARSE)
		return 0;
	if (st->ex.method)
		st->ex.resp_header_end = response_bounds(
			st->ex.resp_head, st->ex.resp_head_len, st->ex.status,
			st->ex.method == HTTP_HEAD, &st->resp_end_at);
	else /* a pipelined request's method is not known here: no end for it (HEAD?) */
		st->ex.resp_header_end = header_end(st->ex.resp_head, st->ex.resp_head_len);
	return 0;
}

#ifdef L7_BOUNDED
__noinline int http_response_head_by_key(__u64 key, __u64 buf)
{
	return http_response_head(bpf_map_lookup_elem(&http_states, &key), buf);
}
#define http_response_head(st, buf) http_response_head_by_key((st)->ex.conn_id, buf)
#endif

static __always_inline void response_started(struct http_state *st, __u16 status, __u64 now,
					     const void *buf, __u64 n, __u32 first_len)
{
	st->ex.status = status;
	st->ex.end_ns = now;
	st->ex.resp_bytes = n;
	st->ex.resp_first_write = first_len;
	http_response_head(st, (__u64)buf);
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
 * that ends the previous chunk or the head), or just "0" CRLF CRLF when written alone. A
 * gathered write is walked to the iovec holding its last written byte (a short write ends
 * mid-buffer, so the last chunk then goes out in a later call, which is looked at in turn), up
 * to LAST_CHUNK_IOVS iovecs (nginx gathers at most 64 per call); the 7 bytes may straddle up to
 * three iovecs (nginx writes "0" CRLF CRLF in a buffer of its own after the data's CRLF).
 * Beyond that, or with sendfile, the next request or the close ends the exchange. */
#define LAST_CHUNK_IOVS 64

static __always_inline bool wrote_last_chunk(const void *buf, __u32 first_len, __u64 n,
					     const struct iovec *iovs, __u64 niov)
{
	static const __u8 want[7] = {'\r', '\n', '0', '\r', '\n', '\r', '\n'};
	__u64 base[3] = {}, len[3] = {}; /* the last three non-empty segments, newest first */
	__u64 rem = n;
	__u32 zero = 0;
	struct iovecs8 *v;

	if (!buf || n < 5)
		return false;
	if (first_len >= n) {
		base[0] = (__u64)buf;
		len[0] = n;
		rem = 0;
	} else if (iovs && niov <= LAST_CHUNK_IOVS) {
		v = bpf_map_lookup_elem(&iov_scratch, &zero); /* not the stack */
		if (!v)
			return false;
		for (int g = 0; g < LAST_CHUNK_IOVS / 8 && rem; g++) {
			__u64 left = niov - g * 8;

			if (g * 8 >= niov ||
			    bpf_probe_read_user(v, sizeof(v->v[0]) * (left >= 8 ? 8 : left & 7),
						iovs + g * 8))
				return false;
			for (int i = 0; i < 8 && rem; i++) {
				__u64 l;

				if (g * 8 + i >= niov)
					return false;
				l = v->v[i].iov_len < rem ? v->v[i].iov_len : rem;
				if (!l)
					continue;
				base[2] = base[1];
				len[2] = len[1];
				base[1] = base[0];
				len[1] = len[0];
				base[0] = (__u64)v->v[i].iov_base;
				len[0] = l;
				rem -= l;
			}
		}
	}
	if (rem || !len[0])
		return false;
	/* Byte k from the end, k = 0..6, compared with the pattern read backwards. */
	for (int k = 0; k < 7; k++) {
		__u64 off = k, addr;
		__u8 c;

		if (off < len[0]) {
			addr = base[0] + len[0] - 1 - off;
		} else if ((off -= len[0]) < len[1]) {
			addr = base[1] + len[1] - 1 - off;
		} else if ((off -= len[1]) < len[2]) {
			addr = base[2] + len[2] - 1 - off;
		} else {
			return k == 5 && n == 5; /* "0" CRLF CRLF written alone */
		}
		if (bpf_probe_read_user(&c, 1, (const void *)addr) || c != want[6 - k])
			return false;
	}
	return true;
}

/* Server: count the exchange as soon as its response's last byte is written (the head said
 * how many there are, or the last chunk went out), not when the next request arrives: an
 * idle keep-alive connection would hold it back, and an event-driven server reads only when
 * a request is there. So reads need no enter hook. */
/* Global (verified once). `lens` is the call's byte count << 32 | its first segment's. */
L7_GLOBAL int http_response_written(struct http_state *st, __u64 buf, __u64 lens, __u64 iovs,
				     __u64 niov)
{
	if (!st || !st->resp_end_at)
		return 0;
	if (st->resp_end_at == RESP_END_CHUNKED) {
		if (!wrote_last_chunk((const void *)buf, (__u32)lens, lens >> 32,
				      (const struct iovec *)iovs, niov))
			return 0;
	} else if (st->ex.resp_bytes < st->resp_end_at) {
		return 0;
	}
	http_complete(st);
	st->state = HTTP_STATE_DONE;
	return 0;
}

#ifdef L7_BOUNDED
__noinline int http_response_written_by_key(__u64 key, __u64 buf, __u64 lens, __u64 iovs,
					    __u64 niov)
{
	return http_response_written(bpf_map_lookup_elem(&http_states, &key), buf, lens, iovs,
				     niov);
}
#define http_response_written(st, buf, lens, iovs, niov)                                     \
	http_response_written_by_key((st)->ex.conn_id, buf, lens, iovs, niov)
#endif

/* The connection's HTTP state, made (idle) on its first call. */
static __always_inline struct http_state *http_state_for(const struct l7_event *ev)
{
	struct http_state *st = bpf_map_lookup_elem(&http_states, &ev->key);
	struct l7_conn *c;

	if (st)
		return st;
	c = bpf_map_lookup_elem(&l7_conns, &ev->key);
	if (!c)
		return NULL;
	bpf_map_update_elem(&http_states, &ev->key, &zero_http_state, BPF_ANY);
	st = bpf_map_lookup_elem(&http_states, &ev->key);
	if (!st)
		return NULL;
	__builtin_memcpy(&st->ex, &c->h, sizeof(c->h));
	st->ex.kind = L7_RECORD_HTTP;
	st->ex.resp_header_end = -1;
	return st;
}

/* The parser: one call's bytes on an HTTP/1.x connection. */
static __always_inline int http_parse(void *ctx, struct l7_event *ev)
{
	struct http_state *st = http_state_for(ev);
	const void *buf = (const void *)ev->buf;
	__u32 first_len = ev->first_len > 0xffffffff ? 0xffffffff : ev->first_len;
	__u64 n = ev->total;
	__u32 tgid = ev->h.tgid;
	__u8 dir = ev->dir;
	bool has_bytes = ev->buf != 0;
	__u8 peek[24] = {};
	__u32 p = 0;
	__u64 sz;
	__u8 method = 0;
	__u16 status = 0;

	if (!st || L7_STAGE <= L7_STAGE_STATE)
		return 0;
	if (ev->classified) {
		/* The capture layer read this call's first bytes (after any it kept from a split
		 * first message) to classify it. */
		p = ev->partial_len & 7;
		__builtin_memcpy(peek, ev->peek.data, 24);
		__builtin_memcpy(st->partial, ev->peek.data, 8);
		st->partial_len = p;
		method = method_of(peek);
		status = method ? 0 : status_of(peek);
		st->state = HTTP_STATE_IDLE;
	} else if (has_bytes) {
		p = st->partial_len & 7;
		for (int i = 0; i < 8; i++) {
			if (i >= p)
				break;
			peek[i] = st->partial[i];
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
	if (!method && !status && has_bytes && st->state != HTTP_STATE_REQUEST &&
	    maybe_split_method(peek, p + first_len)) {
		__builtin_memcpy(st->partial, peek, 8);
		st->partial_len = (p + first_len) & 7;
		return 0;
	}

	if (ev->h.role == L7_ROLE_SERVER) {
		if (dir == L7_DIR_IN) {
			/* A response of unknown length (close-delimited, or its end not seen) ends
			 * when the next request arrives. */
			if (st->state == HTTP_STATE_RESPONSE)
				http_complete(st);
			if (st->state == HTTP_STATE_RESPONSE || st->state == HTTP_STATE_DONE)
				st->state = HTTP_STATE_IDLE;
			if (st->state == HTTP_STATE_IDLE) {
				if (!method) {
					st->partial_len = 0;
					return 0; /* bytes of an exchange begun before we looked */
				}
				new_exchange(st, method, ev->exit_ns, n + p, tgid);
				start_message(st, st->ex.req_head, &st->ex.req_head_len, buf,
					      first_len);
				if (sample_spans)
					http_sample(&st->ex);
			} else {
				st->ex.req_bytes += n;
				head_append(st->ex.req_head, &st->ex.req_head_len, buf, first_len);
			}
			return 0;
		}
		if (status >= 100 && status < 200)
			return 0; /* interim (100 Continue): the final response follows */
		if (status) {
			if (st->state == HTTP_STATE_REQUEST) {
				st->state = HTTP_STATE_RESPONSE;
				response_started(st, status, ev->exit_ns, buf, n, first_len);
				http_response_written(st, has_bytes ? (__u64)buf : 0,
						      n << 32 | first_len, ev->iovs, ev->niov);
			} else if (st->state == HTTP_STATE_RESPONSE ||
				   st->state == HTTP_STATE_DONE) {
				/* Next pipelined request answered: its line is further in the head. */
				if (st->state == HTTP_STATE_RESPONSE)
					http_complete(st);
				st->state = HTTP_STATE_RESPONSE;
				st->ex.pipe_idx += 1;
				st->ex.hflags |= HTTP_FLAG_PIPELINED;
				st->ex.method = 0;
				st->ex.req_bytes = 0;
				response_started(st, status, ev->exit_ns, buf, n, first_len);
			}
			return 0;
		}
		if (st->state == HTTP_STATE_RESPONSE) {
			st->ex.resp_bytes += n;
			st->ex.end_ns = ev->exit_ns;
			http_response_written(st, has_bytes ? (__u64)buf : 0, n << 32 | first_len,
					      ev->iovs, ev->niov);
		}
		return 0;
	}

	/* Client. */
	if (dir == L7_DIR_OUT) {
		if (method && st->state == HTTP_STATE_REQUEST) {
			st->outstanding += 1; /* pipelined */
			st->ex.req_bytes += n;
			head_append(st->ex.req_head, &st->ex.req_head_len, buf, first_len);
		} else if (method) {
			new_exchange(st, method, ev->enter_ns, n + p, tgid);
			st->outstanding = 1;
			start_message(st, st->ex.req_head, &st->ex.req_head_len, buf, first_len);
		} else if (st->state == HTTP_STATE_REQUEST) {
			st->ex.req_bytes += n;
		}
		return 0;
	}
	if (status >= 200 && st->state == HTTP_STATE_REQUEST) {
		response_started(st, status, ev->exit_ns, buf, n, first_len);
		http_complete(st);
		if (st->outstanding > 1) {
			st->outstanding -= 1;
			st->ex.pipe_idx += 1;
			st->ex.hflags |= HTTP_FLAG_PIPELINED;
			st->ex.method = 0;
			st->ex.req_bytes = 0;
		} else {
			st->outstanding = 0;
			st->state = HTTP_STATE_IDLE;
		}
	}
	return 0;
}

/* The connection ended. close(): a request with no response yet was aborted; a finished
 * response is emitted. A socket that closed without a close() from its process (it exited or
 * was killed, or a reset) still ends its exchange, but a server's request is left to the
 * server: it may still answer on the socket it holds (a client that sent its request and
 * went), as its access log will say. */
static __always_inline bool http_close(struct l7_conn *c, __u64 key, bool close_call)
{
	struct http_state *st = bpf_map_lookup_elem(&http_states, &key);

	if (!st)
		return true;
	if (!close_call && st->ex.role == L7_ROLE_SERVER && st->state == HTTP_STATE_REQUEST)
		return false; /* the connection stays: the server may still answer on it */
	if (st->state != HTTP_STATE_IDLE && st->state != HTTP_STATE_DONE) {
		if (st->state == HTTP_STATE_REQUEST) {
			st->ex.hflags |= HTTP_FLAG_ABORTED;
			st->ex.status = 0;
			st->ex.end_ns = bpf_ktime_get_ns();
		}
		http_complete(st);
	}
	bpf_map_delete_elem(&http_states, &key);
	return true;
}

/* A server reading again through OpenSSL has finished its response (as the syscall path sees
 * at the server's next read). */
static __always_inline void http_read_begins(__u64 key)
{
	struct http_state *st = bpf_map_lookup_elem(&http_states, &key);

	if (st && st->ex.role == L7_ROLE_SERVER && st->state == HTTP_STATE_RESPONSE) {
		http_complete(st);
		st->state = HTTP_STATE_IDLE;
	}
}
