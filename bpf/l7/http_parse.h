/* Parsers of the http family: pure functions of bytes already copied into BPF memory, kept
 * apart so tests/bpf/test_http_parse.py can run them (through a BPF_PROG_TYPE_SYSCALL harness,
 * tests/bpf/http_parse_harness.bpf.c) against user space's own parsers on random input. */
#pragma once

#include "http.h"
#include "bounded.h"

#define BYTES_EQ(w, c) /* 0x80 in each byte of w equal to c (exact: no carries between bytes) */ \
	(~((((w) ^ (c)) & 0x7f7f7f7f7f7f7f7fULL) + 0x7f7f7f7f7f7f7f7fULL | ((w) ^ (c)) |     \
	   0x7f7f7f7f7f7f7f7fULL))


static __always_inline bool target_start(__u8 c)
{
	return c == '/' || c == '*' || c == 'h';
}

/* A request line starts with METHOD SP target; the target check keeps e.g. "GET garbage" of
 * another protocol from being taken for HTTP. */
static __always_inline __u8 method_of(const __u8 *b)
{
	if (b[0] == 'G' && b[1] == 'E' && b[2] == 'T' && b[3] == ' ' && target_start(b[4]))
		return HTTP_GET;
	if (b[0] == 'P' && b[1] == 'O' && b[2] == 'S' && b[3] == 'T' && b[4] == ' ' &&
	    target_start(b[5]))
		return HTTP_POST;
	if (b[0] == 'P' && b[1] == 'U' && b[2] == 'T' && b[3] == ' ' && target_start(b[4]))
		return HTTP_PUT;
	if (b[0] == 'H' && b[1] == 'E' && b[2] == 'A' && b[3] == 'D' && b[4] == ' ' &&
	    target_start(b[5]))
		return HTTP_HEAD;
	if (b[0] == 'D' && b[1] == 'E' && b[2] == 'L' && b[3] == 'E' && b[4] == 'T' &&
	    b[5] == 'E' && b[6] == ' ' && target_start(b[7]))
		return HTTP_DELETE;
	if (b[0] == 'P' && b[1] == 'A' && b[2] == 'T' && b[3] == 'C' && b[4] == 'H' &&
	    b[5] == ' ' && target_start(b[6]))
		return HTTP_PATCH;
	if (b[0] == 'O' && b[1] == 'P' && b[2] == 'T' && b[3] == 'I' && b[4] == 'O' &&
	    b[5] == 'N' && b[6] == 'S' && b[7] == ' ' && target_start(b[8]))
		return HTTP_OPTIONS;
	if (b[0] == 'C' && b[1] == 'O' && b[2] == 'N' && b[3] == 'N' && b[4] == 'E' &&
	    b[5] == 'C' && b[6] == 'T' && b[7] == ' ' && b[8] > ' ')
		return HTTP_CONNECT;
	if (b[0] == 'T' && b[1] == 'R' && b[2] == 'A' && b[3] == 'C' && b[4] == 'E' &&
	    b[5] == ' ' && target_start(b[6]))
		return HTTP_TRACE;
	return 0;
}

static __always_inline bool digit(__u8 c)
{
	return c >= '0' && c <= '9';
}

/* "HTTP/1.x NNN" -> NNN, or 0. */
static __always_inline __u16 status_of(const __u8 *b)
{
	if (b[0] != 'H' || b[1] != 'T' || b[2] != 'T' || b[3] != 'P' || b[4] != '/' ||
	    b[5] != '1' || b[6] != '.' || (b[7] != '0' && b[7] != '1') || b[8] != ' ' ||
	    !digit(b[9]) || !digit(b[10]) || !digit(b[11]) || b[9] == '0')
		return 0;
	return (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
}

/* A split request line ("GE" then "T / HTTP/1.1"): short upper-case bytes wait for more. */
static __always_inline bool maybe_split_method(const __u8 *b, __u32 n)
{
	if (n == 0 || n >= 8)
		return false;
	for (int i = 0; i < 8; i++) {
		if (i >= n)
			break;
		if (b[i] < 'A' || b[i] > 'Z')
			return false;
	}
	return true;
}

static const __u8 method_len[HTTP_TRACE + 1] = { 0, 3, 4, 3, 6, 4, 5, 7, 7, 5 };

struct path_scan {
	__u64 h;
	__u32 len; /* bytes mixed in, a numeric segment counting as one */
	__u32 pos; /* the next byte of the head to read */
	__u8 seg_start; /* pos starts a segment: the path's start, or just after a '/' */
	__u8 _pad[7];
};

struct path_input { /* on the stack: 16 bytes, as before numeric (old kernels' frames) */
	const __u8 *head;
	__u32 end;
	__u32 numeric; /* hash each numeric segment as one marker (path_hash's doc) */
};

/* The hash's running state, in map memory for the reason given at header_scratch. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct path_scan);
} path_scratch SEC(".maps");

static __always_inline __u64 mix64(__u64 h)
{
	h ^= h >> 30;
	h *= 0xbf58476d1ce4e5b9ULL;
	h ^= h >> 27;
	h *= 0x94d049bb133111ebULL;
	return h ^ (h >> 31);
}

#define HIGH_BITS 0x8080808080808080ULL
/* What a numeric segment is mixed in as: '?' ends a path, so no bytes of one equal it. */
#define NUMERIC_MARK 0x3f3f3f3f3f3f3f3fULL
/* Longest numeric segment taken for one (a 64-bit id has at most 20 digits); a longer one is
 * hashed as it is, which only splits its route over more hashes. */
#define NUMERIC_MAX 24

/* 0x80 in each byte of w that is an ASCII digit (exact per byte, as BYTES_EQ). */
static __always_inline __u64 digit_bytes(__u64 w)
{
	__u64 t = w ^ 0x3030303030303030ULL;

	return ~(((t & 0x7f7f7f7f7f7f7f7fULL) + 0x7676767676767676ULL) | t) & HIGH_BITS;
}

/* 0x80 in each byte where the path stops: space, CR, LF, '?', and byte `avail` (its end). */
static __always_inline __u64 path_stops(__u64 w, __u32 avail)
{
	__u64 stop = BYTES_EQ(w, 0x2020202020202020ULL) | BYTES_EQ(w, 0x0d0d0d0d0d0d0d0dULL) |
		     BYTES_EQ(w, 0x0a0a0a0a0a0a0a0aULL) | BYTES_EQ(w, 0x3f3f3f3f3f3f3f3fULL);

	if (avail < 8)
		stop |= 0x80ULL << (8 * avail);
	return stop;
}

/* The index of the lowest byte flagged in m (m != 0). */
static __always_inline __u32 first_byte(__u64 m)
{
	__u64 low = m & -m;
	__u32 j = 0;

	if (!(low & 0xffffffffULL)) {
		j += 4;
		low >>= 32;
	}
	if (!(low & 0xffff)) {
		j += 2;
		low >>= 16;
	}
	if (!(low & 0xff))
		j += 1;
	return j;
}

static __always_inline __u64 load_path_word(const struct path_input *in, __u32 off)
{
	barrier_var(off); /* the load must use the checked register */
	return *(const __u64 *)(in->head + (off & (HTTP_HEAD_LEN - 1)));
}

/* The length of the segment at `pos` when it is a number (-?[0-9]+, user space's {id}) that
 * ends at a '/' or where the path stops, within NUMERIC_MAX bytes; else 0. */
static __always_inline __u32 numeric_len(const struct path_input *in, __u32 pos)
{
	__u64 w, term, ok, want;
	__u32 off, k;

	for (__u32 i = 0; i < NUMERIC_MAX / 8; i++) {
		off = pos + 8 * i;
		if (off >= in->end) /* (from the 2nd word on: the digits ran to the path's end) */
			return 8 * i;
		if (off > HTTP_HEAD_LEN - 8)
			return 0;
		w = load_path_word(in, off);
		term = path_stops(w, in->end - off) | BYTES_EQ(w, 0x2f2f2f2f2f2f2f2fULL);
		ok = digit_bytes(w);
		if (i == 0)
			ok |= BYTES_EQ(w, 0x2d2d2d2d2d2d2d2dULL) & 0x80; /* a leading '-' */
		if (term) {
			k = first_byte(term);
			want = k ? HIGH_BITS >> (64 - 8 * k) : 0;
			if ((ok & want) != want)
				return 0;
			k += 8 * i;
			/* "" and "-" are no numbers */
			if (k == 0 || (k == 1 && (w & 0xff) == '-'))
				return 0;
			return k;
		}
		if (ok != HIGH_BITS)
			return 0;
	}
	return 0;
}

/* One step of the hash: a numeric segment (as NUMERIC_MARK), or up to eight bytes of the path
 * mixed in as one word: cut where the path stops (then the hash is done), and, with numeric
 * segments templated, just after a '/' that a digit or '-' follows (a slash in a word's last
 * byte cuts too: the byte after it is not in the word). */
static long path_word(__u32 i, struct path_input *in)
{
	__u32 zero = 0, pos, avail, j;
	struct path_scan *ps = bpf_map_lookup_elem(&path_scratch, &zero);
	__u64 w, stop, cut = 0, first;

	if (!ps || i > HTTP_PATH_MAX + 1)
		return 1;
	pos = ps->pos;
	if (ps->seg_start && in->numeric) {
		ps->seg_start = 0;
		j = numeric_len(in, pos);
		if (j) {
			ps->h = mix64(ps->h ^ NUMERIC_MARK);
			ps->len += 1;
			ps->pos = pos + j;
			return 0;
		}
	}
	if (pos >= in->end || pos > HTTP_HEAD_LEN - 8)
		return 1;
	w = load_path_word(in, pos);
	avail = in->end - pos;
	stop = path_stops(w, avail);
	if (in->numeric)
		cut = BYTES_EQ(w, 0x2f2f2f2f2f2f2f2fULL) &
		      (((digit_bytes(w) | BYTES_EQ(w, 0x2d2d2d2d2d2d2d2dULL)) >> 8) |
		       0x8000000000000000ULL);
	if (!(stop | cut)) {
		ps->h = mix64(ps->h ^ w);
		ps->len += 8;
		ps->pos = pos + 8;
		return 0;
	}
	first = (stop | cut) & -(stop | cut);
	j = first_byte(first);
	if (first & stop) {
		ps->h = mix64(ps->h ^ (j ? w & (~0ULL >> (64 - 8 * j)) : 0));
		ps->len += j;
		return 1;
	}
	j += 1; /* the word up to and including the '/' */
	ps->h = mix64(ps->h ^ (j < 8 ? w & (~0ULL >> (64 - 8 * j)) : w));
	ps->len += j;
	ps->pos = pos + j;
	ps->seg_start = 1;
	return 0;
}

#ifdef L7_BOUNDED
/* A head's bytes for the global steps (see L7_LOOP), which take no pointers on 5.10. */
struct head_copy {
	__u8 head[HTTP_HEAD_LEN];
	__u8 room[HTTP_HEAD_LEN]; /* word loads near the end (a head in place has what follows) */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct head_copy);
} head_copy SEC(".maps");

static __always_inline struct head_copy *head_copy_of(const __u8 *head)
{
	__u32 zero = 0;
	struct head_copy *hc = bpf_map_lookup_elem(&head_copy, &zero);

	if (!hc)
		return NULL;
	/* Words, not bytes (a head in place is 8-aligned): an eighth of the instructions. */
	for (int k = 0; k < HTTP_HEAD_LEN / 8; k++)
		((__u64 *)hc->head)[k] = ((const __u64 *)head)[k];
	return hc;
}

static __always_inline const __u8 *head_copied(void)
{
	__u32 zero = 0;
	struct head_copy *hc = bpf_map_lookup_elem(&head_copy, &zero);

	return hc ? hc->head : NULL;
}

__noinline int path_word_bounded(__u32 i, __u32 end, __u32 numeric)
{
	struct path_input in = { .head = head_copied(), .end = end, .numeric = numeric };

	if (!in.head)
		return 1;
	return path_word(i, &in) != 0;
}
#endif

/* A 64-bit hash of the path: from after "METHOD " to the first space, CR, LF or '?' (the
 * bytes user space's request_paths() cuts out), at most HTTP_PATH_MAX of them, mostly eight
 * bytes a step (bpf_loop: the verifier checks one step, not a byte loop of 128). 0 means "no
 * path". With `numeric`, each segment that is a number (user space's RouteTemplater makes it
 * {id}, whatever its digits) is mixed in as one marker, so /users/7 and /users/1234 hash the
 * same and user space names their route once; the caller sets it only when no configured
 * route pattern has a numeric literal segment (that would tell such paths apart). */
static __noinline __u64 path_hash(const __u8 *head, __u32 head_len, __u32 method,
				  __u32 numeric)
{
	__u32 zero = 0, start, end;
	struct path_scan *ps;
	struct path_input in;
	__u64 h, m = method & 0xff; /* one 64-bit register, checked and used */

	in.head = head; /* (set before the lookup: nothing to keep across it) */
	in.numeric = numeric;
	ps = bpf_map_lookup_elem(&path_scratch, &zero);
	if (!ps || m > HTTP_TRACE)
		return 0;
	start = method_len[m] + 1;
	end = head_len < start + HTTP_PATH_MAX ? head_len : start + HTTP_PATH_MAX;
	in.end = end < HTTP_HEAD_LEN ? end : HTTP_HEAD_LEN;
	ps->h = 0x9e3779b97f4a7c15ULL;
	ps->len = 0;
	ps->pos = start;
	ps->seg_start = 1;
	/* each step moves on by a byte at least: a path of HTTP_PATH_MAX bytes ends within */
#ifdef L7_BOUNDED
	if (!head_copy_of(head))
		return 0;
	for (__u32 i = 0; i < HTTP_PATH_MAX + 2; i++)
		if (path_word_bounded(i, in.end, in.numeric))
			break;
	ps = bpf_map_lookup_elem(&path_scratch, &zero);
	if (!ps)
		return 0;
#else
	L7_LOOP(HTTP_PATH_MAX + 2, HTTP_PATH_MAX + 2, path_word, &in);
#endif
	h = mix64(ps->h ^ ps->len);
	return h ? h : 1;
}

struct header_scan {
	const __u8 *head;
	__u32 len;
	int end; /* bytes up to and including the first CRLFCRLF, or -1 */
	__u8 te; /* a Transfer-Encoding line */
	__u8 _pad[3];
	int cl_at; /* offset just past the first "Content-Length:", or -1 */
	int digits; /* of the Content-Length value read so far; -1: not a length */
	__u64 value;
};

#define LE8(a, b, c, d, e, f, g, h)                                                        \
	((__u64)(a) | (__u64)(b) << 8 | (__u64)(c) << 16 | (__u64)(d) << 24 | (__u64)(e) << 32 | \
	 (__u64)(f) << 40 | (__u64)(g) << 48 | (__u64)(h) << 56)

/* A header line starting at `ls`: Content-Length or Transfer-Encoding, in any case? Letters
 * are compared with bit 0x20 set (that folds only their case); '-' and ':' exactly. */
static __always_inline void header_line(struct header_scan *sc, const __u8 *head, __u32 ls,
					__u32 len)
{
	__u64 w0, w1;

	barrier_var(ls);
	if (ls > HTTP_HEAD_LEN - 18 || ls + 15 > len)
		return;
	w0 = *(const __u64 *)(head + ls);
	w1 = *(const __u64 *)(head + ls + 7);
	if ((w0 | 0x0020202020202020ULL) == LE8('c', 'o', 'n', 't', 'e', 'n', 't', '-') &&
	    (w1 | 0x0020202020202000ULL) == LE8('-', 'l', 'e', 'n', 'g', 't', 'h', ':')) {
		if (sc->cl_at < 0)
			sc->cl_at = ls + 15;
		return;
	}
	if (ls + 18 > len)
		return;
	w1 = *(const __u64 *)(head + ls + 8);
	if ((w0 | 0x2020202020202020ULL) == LE8('t', 'r', 'a', 'n', 's', 'f', 'e', 'r') &&
	    (w1 | 0x2020202020202000ULL) == LE8('-', 'e', 'n', 'c', 'o', 'd', 'i', 'n') &&
	    (*(const __u64 *)(head + ls + 10) | 0x0020202020202020ULL) ==
		    LE8('n', 'c', 'o', 'd', 'i', 'n', 'g', ':'))
		sc->te = 1;
}

static __always_inline bool header_scan_one(struct header_scan *sc, const __u8 *head, __u32 k,
					    __u32 len, const bool fields)
{
	__u64 lf;

	if (k >= len)
		return true;
	lf = BYTES_EQ(*(const __u64 *)(head + k), 0x0a0a0a0a0a0a0a0aULL);
	if (len - k < 8)
		lf &= (1ULL << ((len - k) * 8)) - 1; /* bytes past len are stale */
	if (!lf)
		return false;
#pragma unroll
	for (__u32 j = 0; j < 8; j++) {
		__u32 at = k + j; /* an LF: is it the end of CR LF CR LF? */

		if (!((lf >> (8 * j + 7)) & 1))
			continue;
		if (at >= 3) {
			at -= 3;
			barrier_var(at); /* the verifier must see the bound on the register used */
			if (at <= HTTP_HEAD_LEN - 4 &&
			    *(const __u32 *)(head + at) == 0x0a0d0a0d) {
				sc->end = at + 4;
				return true;
			}
		}
		if (fields)
			header_line(sc, head, k + j + 1, len);
	}
	return false;
}

/* Four words a call (a call per word cost more than the word's work). */
static long header_scan_word(__u32 i, struct header_scan *sc)
{
	__u32 k = (i & (HTTP_HEAD_LEN / 32 - 1)) * 32, len = sc->len;
	const __u8 *head = sc->head;

	if (i >= HTTP_HEAD_LEN / 32)
		return 1;
	return header_scan_one(sc, head, k, len, false) ||
	       header_scan_one(sc, head, k + 8, len, false) ||
	       header_scan_one(sc, head, k + 16, len, false) ||
	       header_scan_one(sc, head, k + 24, len, false);
}

/* The same, one word a call, also noting Content-Length and Transfer-Encoding lines (more
 * branches a word: four words a call would be too many paths for the verifier). */
/* The fields scan keeps its state in map memory, not on the stack: the verifier follows
 * what a bpf_loop callback writes to the caller's stack until it stops changing, and a
 * Content-Length offset found in one word changes it (~180,000 more instructions to verify,
 * per program). Map memory it does not track. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct header_scan);
} header_scratch SEC(".maps");

struct header_input {
	const __u8 *head; /* on the stack: a pointer loaded back from map memory is a number */
	__u32 len;
};

static long header_fields_word(__u32 i, struct header_input *in)
{
	__u32 zero = 0, k = (i & (HTTP_HEAD_LEN / 8 - 1)) * 8;
	struct header_scan *sc = bpf_map_lookup_elem(&header_scratch, &zero);

	if (!sc || i >= HTTP_HEAD_LEN / 8)
		return 1;
	return header_scan_one(sc, in->head, k, in->len, true);
}

#ifdef L7_BOUNDED
/* A step of header_end on the head copy: 0 go on, 1 done without an end, 2 + the end. */
__noinline int header_scan_word_bounded(__u32 i, __u32 len)
{
	struct header_scan sc = { .head = head_copied(), .len = len, .end = -1, .cl_at = -1 };

	if (!sc.head || len > HTTP_HEAD_LEN)
		return 1;
	if (!header_scan_word(i, &sc))
		return 0;
	return sc.end >= 0 && sc.end <= HTTP_HEAD_LEN ? 2 + sc.end : 1;
}

__noinline int header_fields_word_bounded(__u32 i, __u32 len)
{
	struct header_input in = { .head = head_copied(), .len = len };

	if (!in.head || len > HTTP_HEAD_LEN)
		return 1;
	return header_fields_word(i, &in) != 0;
}
#endif

/* Bytes up to and including the first CRLFCRLF of a head, or -1 when the head does not hold
 * it (user space's header_lengths() rule). Eight bytes a step: a byte loop cost ~300 ns a
 * request. */
static __always_inline int header_end(const __u8 *head, __u32 len)
{
	struct header_scan sc = { .head = head, .len = len < HTTP_HEAD_LEN ? len : HTTP_HEAD_LEN,
				  .end = -1, .cl_at = -1 };

#ifdef L7_BOUNDED
	int r = 0;

	if (!head_copy_of(head))
		return -1;
	for (__u32 i = 0; i < HTTP_HEAD_LEN / 32; i++) {
		r = header_scan_word_bounded(i, sc.len);
		if (r)
			break;
	}
	return r >= 2 ? r - 2 : -1;
#else
	L7_LOOP(HTTP_HEAD_LEN / 32, HTTP_HEAD_LEN / 32, header_scan_word, &sc);
	return sc.end;
#endif
}

/* W3C trace context: the sampled bit of a request's "traceparent" header, or -1 without one.
 * The value is version "00", trace id, parent id and flags, dash-separated (55 characters);
 * the sampled bit is the low bit of the flags' second hex digit. The header must lie within
 * the head's first HTTP_HEAD_LEN - TP_SPAN bytes (what user space sees of a head too). */
#define TP_VALUE 55
#define TP_SPAN (12 + 1 + TP_VALUE) /* name, one optional blank, value */

static __always_inline int traceparent_at(const __u8 *head, __u32 ls, __u32 len)
{
	__u64 w0, w1;
	__u32 v;
	__u8 c;

	barrier_var(ls);
	if (ls > HTTP_HEAD_LEN - TP_SPAN || ls + 12 + TP_VALUE > len)
		return -1;
	w0 = *(const __u64 *)(head + ls);
	w1 = *(const __u64 *)(head + ls + 4);
	if ((w0 | 0x2020202020202020ULL) != LE8('t', 'r', 'a', 'c', 'e', 'p', 'a', 'r') ||
	    (w1 | 0x0020202020202020ULL) != LE8('e', 'p', 'a', 'r', 'e', 'n', 't', ':'))
		return -1;
	v = ls + 12;
	if (head[v] == ' ' || head[v] == '\t') {
		v += 1;
		if (v + TP_VALUE > len)
			return -1;
	}
	barrier_var(v);
	if (v > HTTP_HEAD_LEN - TP_VALUE)
		return -1;
	if (head[v + 2] != '-' || head[v + 35] != '-' || head[v + 52] != '-')
		return -1;
	c = head[v + 54];
	if (c >= '0' && c <= '9')
		return (c - '0') & 1;
	c |= 0x20;
	if (c >= 'a' && c <= 'f')
		return (c - 'a' + 10) & 1;
	return -1;
}

struct tp_scan {
	const __u8 *head;
	__u32 len;
	int sampled; /* -1: no traceparent (yet) */
};

/* Eight bytes a call: a line starts after each LF among them. */
static long tp_scan_word(__u32 i, struct tp_scan *sc)
{
	__u32 k = (i & (HTTP_HEAD_LEN / 8 - 1)) * 8, len = sc->len;
	const __u8 *head = sc->head;
	__u64 lf;
	int r;

	if (i >= HTTP_HEAD_LEN / 8 || k >= len)
		return 1;
	lf = BYTES_EQ(*(const __u64 *)(head + k), 0x0a0a0a0a0a0a0a0aULL);
	if (len - k < 8)
		lf &= (1ULL << ((len - k) * 8)) - 1;
	if (!lf)
		return 0;
#pragma unroll
	for (__u32 j = 0; j < 8; j++) {
		if (!((lf >> (8 * j + 7)) & 1))
			continue;
		r = traceparent_at(head, k + j + 1, len);
		if (r >= 0) {
			sc->sampled = r;
			return 1;
		}
	}
	return 0;
}

#ifdef L7_BOUNDED
/* A step of traceparent_sampled on the head copy: 0 go on, 1 done without one, 2 + sampled. */
__noinline int tp_scan_word_bounded(__u32 i, __u32 len)
{
	struct tp_scan sc = { .head = head_copied(), .len = len, .sampled = -1 };

	if (!sc.head || len > HTTP_HEAD_LEN)
		return 1;
	if (!tp_scan_word(i, &sc))
		return 0;
	return sc.sampled >= 0 ? 2 + (sc.sampled & 1) : 1;
}
#endif

static __always_inline int traceparent_sampled(const __u8 *head, __u32 len)
{
	struct tp_scan sc = { .head = head, .len = len < HTTP_HEAD_LEN ? len : HTTP_HEAD_LEN,
			      .sampled = -1 };

#ifdef L7_BOUNDED
	int r = 0;

	if (!head_copy_of(head))
		return -1;
	for (__u32 i = 0; i < HTTP_HEAD_LEN / 8; i++) {
		r = tp_scan_word_bounded(i, sc.len);
		if (r)
			break;
	}
	return r >= 2 ? r - 2 : -1;
#else
	L7_LOOP(HTTP_HEAD_LEN / 8, HTTP_HEAD_LEN / 8, tp_scan_word, &sc);
	return sc.sampled;
#endif
}

/* One character of a Content-Length value: optional blanks, 1 to 18 digits, then CR (or
 * blanks before it). Run by bpf_loop over the map scratch (sc->value, sc->digits; -1 digits:
 * not a length), so the verifier checks one character, not 32 of them. */
static long content_length_char(__u32 i, struct header_input *in)
{
	__u32 zero = 0, o;
	struct header_scan *sc = bpf_map_lookup_elem(&header_scratch, &zero);
	__u8 c;

	if (!sc || sc->cl_at < 0)
		return 1;
	o = (__u32)sc->cl_at + i;
	if (o >= in->len || o >= HTTP_HEAD_LEN) {
		sc->digits = -1;
		return 1;
	}
	barrier_var(o); /* index by the checked register (not a hoisted head + at) */
	c = in->head[o & (HTTP_HEAD_LEN - 1)];
	if (c >= '0' && c <= '9') {
		if (sc->digits >= 18) {
			sc->digits = -1;
			return 1;
		}
		sc->value = sc->value * 10 + (c - '0');
		sc->digits += 1;
		return 0;
	}
	if (c == ' ' || c == '\t')
		return sc->digits > 0; /* blanks before the digits, or after them: done */
	if (c != '\r')
		sc->digits = -1;
	return 1;
}

#ifdef L7_BOUNDED
__noinline int content_length_char_bounded(__u32 i, __u32 len)
{
	struct header_input in = { .head = head_copied(), .len = len };

	if (!in.head || len > HTTP_HEAD_LEN)
		return 1;
	return content_length_char(i, &in) != 0;
}
#endif

/* A response whose body ends with the last chunk ("0" CRLF CRLF) rather than at a length. */
#define RESP_END_CHUNKED (~0ULL)

/* Where a response's head ends and, when its head says so, where its body ends: header block
 * plus Content-Length, the header block alone when there is no body (HEAD, 204, 304), or
 * RESP_END_CHUNKED with a Transfer-Encoding. `end_at` is 0 when the head does not tell
 * (close-delimited, head cut off). */
static __always_inline int response_bounds(const __u8 *head, __u32 len, __u16 status,
					   bool head_request, __u64 *end_at)
{
	__u32 zero = 0;
	struct header_scan *sc = bpf_map_lookup_elem(&header_scratch, &zero);
	int end;

	struct header_input in = { .head = head, .len = len < HTTP_HEAD_LEN ? len : HTTP_HEAD_LEN };

	*end_at = 0;
	if (!sc)
		return -1;
	sc->end = -1;
	sc->te = 0;
	sc->cl_at = -1;
#ifdef L7_BOUNDED
	if (!head_copy_of(head))
		return -1;
	for (__u32 i = 0; i < HTTP_HEAD_LEN / 8; i++)
		if (header_fields_word_bounded(i, in.len))
			break;
	sc = bpf_map_lookup_elem(&header_scratch, &zero);
	if (!sc)
		return -1;
#else
	L7_LOOP(HTTP_HEAD_LEN / 8, HTTP_HEAD_LEN / 8, header_fields_word, &in);
#endif
	end = sc->end;
	if (end < 0 || end > HTTP_HEAD_LEN)
		return -1;
	if (head_request || status == 204 || status == 304) {
		*end_at = end;
		return end;
	}
	if (sc->te) {
		*end_at = RESP_END_CHUNKED;
		return end;
	}
	if (sc->cl_at < 0)
		return end;
	in.len = end; /* the value ends within the header block */
	sc->value = 0;
	sc->digits = 0;
#ifdef L7_BOUNDED
	for (__u32 i = 0; i < 32; i++)
		if (content_length_char_bounded(i, in.len))
			break;
	sc = bpf_map_lookup_elem(&header_scratch, &zero);
	if (!sc)
		return -1;
#else
	L7_LOOP(32, 32, content_length_char, &in);
#endif
	if (sc->digits > 0)
		*end_at = end + sc->value;
	return end;
}
