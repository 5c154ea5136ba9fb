/* HTTP/2 (and gRPC) on the capture layer: the kernel walks the frames, user space parses them.
 *
 * Every call's bytes on an HTTP/2 connection are walked frame by frame (bpf_loop, state kept
 * per connection and direction, so a frame split across calls, or a header split across
 * iovecs, is followed). What crosses to user space is what its parser needs and nothing more:
 * the client preface, every frame's 9-byte header, and the payloads of every frame but DATA.
 * A DATA frame's payload is walked over, whatever its size: HPACK state (in HEADERS and
 * CONTINUATION payloads) therefore reaches user space whole however large the writes and
 * however many streams are in flight, at a few bytes a frame. l7/protocols/http2.py reads the
 * stream knowing DATA payloads are never in it. */
#pragma once

#include "capture.h"

#define H2_PREFACE_LEN 24
#define H2_FRAME_HEADER 9
#define H2_DATA 0x0
/* Pieces (a frame header, a payload, an iovec change) one call's walk may take: a 1 MiB write
 * of 16 KiB DATA frames is ~200; past this the walk gives the connection up, counted. */
#define H2_MAX_PIECES 8192
/* The same without bpf_loop (l7_bounded): each piece is verified again, so far fewer; a call
 * with more gives its connection up, counted the same way. */
#define H2_BOUNDED_PIECES 64

/* The client connection preface, "PRI * HTTP/2.0" (its first 14 bytes suffice). */
static __always_inline __u8 http2_classify(const struct l7_peek *p)
{
	const __u8 *b = p->data;

	if (p->transport != L7_TCP || p->len < 14)
		return L7_ROLE_UNKNOWN;
	if (b[0] == 'P' && b[1] == 'R' && b[2] == 'I' && b[3] == ' ' && b[4] == '*' &&
	    b[5] == ' ' && b[6] == 'H' && b[7] == 'T' && b[8] == 'T' && b[9] == 'P' &&
	    b[10] == '/' && b[11] == '2' && b[12] == '.' && b[13] == '0')
		return p->dir == L7_DIR_OUT ? L7_ROLE_CLIENT : L7_ROLE_SERVER;
	return L7_ROLE_UNKNOWN;
}

/* Where the walk of one direction of a connection is. */
struct h2_dir {
	__u32 payload_left; /* bytes of the current frame's payload still to come */
	__u8 keep; /* the current frame's payload is shipped (not DATA) */
	__u8 hdr_have; /* bytes of a frame header seen so far */
	__u8 preface_left; /* client preface bytes still to pass (client -> server only) */
	__u8 lost; /* the walk lost the frames: nothing more is shipped */
	__u8 hdr[24]; /* the frame header being read (9 bytes used; room for the verifier) */
};

struct h2_state {
	struct h2_dir d[2]; /* 0: client -> server bytes; 1: server -> client */
};

/* LRU: a close we never see must not leak. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct h2_state);
} h2_states SEC(".maps");

/* The walk's frame state for the call, in map memory (see l7_walk). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_dir);
} h2_walk_scratch SEC(".maps");

/* Room for `n` more bytes in the record being built, shipping it first if it is too full. */
static __always_inline void h2_room(struct l7_walk *w, struct l7_event *ev, __u32 n)
{
	if (w->fill + n <= L7_CHUNK)
		return;
	w->records += 1;
	w->seq += 1;
	emit_built(&ev->h, ev, L7_RECORD_DATA, w->fill, 0, w->seq);
	w->fill = 0;
}

/* One piece of the call a callback: the preface, a frame header (or part of one), or a
 * payload (or part of one), within the current iovec. */
static long h2_piece(__u32 i, void *unused)
{
	__u32 zero = 0;
	struct l7_walk *w = bpf_map_lookup_elem(&l7_walk_scratch, &zero);
	struct l7_data_buf *b = bpf_map_lookup_elem(&l7_data_scratch, &zero);
	struct h2_dir *f = bpf_map_lookup_elem(&h2_walk_scratch, &zero);
	struct l7_event *ev = l7_event();
	__u64 avail, take, fill, at;
	bool copy;

	if (!w || !b || !f || !ev || f->lost || !w->remaining)
		return 1;
	if (w->off >= w->len) {
		const struct iovec *iovs = (const struct iovec *)w->iovs;
		struct iovec v;

		w->seg += 1;
		if (!iovs || w->seg >= w->niov || w->seg >= 1024)
			return 1;
		if (bpf_probe_read_user(&v, sizeof(v), &iovs[w->seg & 1023]))
			return 1;
		w->buf = (__u64)v.iov_base;
		w->len = v.iov_len;
		w->off = 0;
		return 0;
	}
	avail = w->len - w->off;
	if (avail > w->remaining)
		avail = w->remaining;
	at = w->buf + w->off;
	if (f->preface_left || f->payload_left) {
		__u64 left = f->preface_left ? f->preface_left : f->payload_left;

		take = avail < left ? avail : left;
		copy = f->preface_left || f->keep;
		if (copy) {
			h2_room(w, ev, 1);
			fill = w->fill & (L7_CHUNK - 1);
			if (take > L7_CHUNK - fill)
				take = L7_CHUNK - fill;
			barrier_var(take);
			if (take > L7_CHUNK)
				return 1;
			if (take && bpf_probe_read_user(b->data + fill, take, (const void *)at))
				__builtin_memset(b->data, 0, 8);
			w->fill = fill + take;
		}
		if (f->preface_left)
			f->preface_left -= take;
		else
			f->payload_left -= take;
	} else {
		__u32 have = f->hdr_have & 15;

		take = H2_FRAME_HEADER - have;
		if (take > avail)
			take = avail;
		barrier_var(take);
		if (have >= H2_FRAME_HEADER || take > H2_FRAME_HEADER)
			return 1;
		if (bpf_probe_read_user(f->hdr + have, take, (const void *)at))
			return 1;
		f->hdr_have = have + take;
		if (f->hdr_have == H2_FRAME_HEADER) {
			f->hdr_have = 0;
			f->payload_left = (__u32)f->hdr[0] << 16 | (__u32)f->hdr[1] << 8 | f->hdr[2];
			f->keep = f->hdr[3] != H2_DATA;
			h2_room(w, ev, H2_FRAME_HEADER);
			fill = w->fill & (L7_CHUNK - 1);
			__builtin_memcpy(b->data + fill, f->hdr, H2_FRAME_HEADER);
			w->fill = fill + H2_FRAME_HEADER;
		}
	}
	w->off += take;
	w->remaining -= take;
	return 0;
}

L7_BOUNDED_STEP(h2_piece)

/* The parser: walk the call's frames, ship what user space's parser needs. */
static __always_inline int http2_parse(void *ctx, struct l7_event *ev)
{
	__u32 zero = 0, side;
	struct l7_walk *w = bpf_map_lookup_elem(&l7_walk_scratch, &zero);
	struct h2_dir *f = bpf_map_lookup_elem(&h2_walk_scratch, &zero);
	struct l7_conn *c = bpf_map_lookup_elem(&l7_conns, &ev->key);
	struct h2_state *st;

	if (!w || !f || !c)
		return 0;
	l7_event_identity(ev, c);
	side = (ev->dir == L7_DIR_OUT) == (c->h.role == L7_ROLE_CLIENT) ? 0 : 1;
	w->seq = *conn_seq(c, ev->dir);
	st = bpf_map_lookup_elem(&h2_states, &ev->key);
	if (!st) {
		struct h2_state fresh = {};

		/* A new connection: its first client bytes are the preface (it was classified by
		 * them); an entry evicted meanwhile would start mid-stream, which the sequence
		 * numbers show user space. */
		fresh.d[0].preface_left = H2_PREFACE_LEN;
		bpf_map_update_elem(&h2_states, &ev->key, &fresh, BPF_ANY);
		st = bpf_map_lookup_elem(&h2_states, &ev->key);
		if (!st)
			return 0;
	}
	__builtin_memcpy(f, &st->d[side & 1], sizeof(*f));
	if (f->lost)
		return 0;
	if (!ev->buf) { /* sendfile: bytes the walk cannot see */
		f->lost = 1;
	} else {
		l7_walk_start(w, ev);
		L7_LOOP(H2_MAX_PIECES, H2_BOUNDED_PIECES, h2_piece, NULL);
		if (w->remaining)
			f->lost = 1; /* out of pieces or iovecs: the frames are lost from here */
	}
	if (w->fill || f->lost) {
		w->seq += 1;
		emit_built(&ev->h, ev, L7_RECORD_DATA, w->fill, f->lost ? (w->remaining ?: 1) : 0,
			   w->seq);
		if (f->lost)
			coverage_add(L7_PROTO_HTTP2, L7_COV_TRUNCATED);
	}
	/* Looked up again: the verifier does not carry the pointers across bpf_loop. */
	st = bpf_map_lookup_elem(&h2_states, &ev->key);
	if (st)
		__builtin_memcpy(&st->d[side & 1], f, sizeof(*f));
	c = bpf_map_lookup_elem(&l7_conns, &ev->key);
	if (c)
		*conn_seq(c, ev->dir) = w->seq;
	return 0;
}

static __always_inline bool http2_close(struct l7_conn *c, __u64 key, bool close_call)
{
	bpf_map_delete_elem(&h2_states, &key);
	return l7_close_shipped(c, key, close_call);
}
