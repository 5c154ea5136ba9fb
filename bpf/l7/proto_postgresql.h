/* PostgreSQL's kernel classifier; mirrored by probewire.l7.protocols.postgresql.classify.
 * A connection is PostgreSQL when a call starts with a start-up packet (StartupMessage v3,
 * SSLRequest, GSSENCRequest, CancelRequest) or, picked up mid-stream, with a Query that is all
 * of the call, a Parse or a Bind (then more messages). Only requests are recognised: a client's
 * request starts every cycle. */
#pragma once

#include "l7_peek.h"

#define PG_SSL_REQUEST 80877103
#define PG_GSSENC_REQUEST 80877104
#define PG_CANCEL_REQUEST 80877102
#define PG_PROTOCOL_3 196608
#define PG_MAX_STARTUP 10000

static __always_inline bool pg_printable(__u8 c)
{
	return c >= 0x21 && c <= 0x7e;
}

static __always_inline __u8 postgresql_classify(const struct l7_peek *p)
{
	__u32 n = peek_len(p), call = peek_call_len(p), length, code;
	__u8 kind;

	if (p->transport != L7_TCP)
		return L7_ROLE_UNKNOWN;
	if (n >= 8) {
		length = peek_be32(p, 0);
		code = peek_be32(p, 4);
		if (length == 8 && (code == PG_SSL_REQUEST || code == PG_GSSENC_REQUEST))
			return peek_request_role(p);
		if (length == 16 && code == PG_CANCEL_REQUEST)
			return peek_request_role(p);
		if (code == PG_PROTOCOL_3 && length >= 9 && length <= PG_MAX_STARTUP && n >= 9 &&
		    ((p->data[8] >= 'a' && p->data[8] <= 'z') || p->data[8] == '_'))
			return peek_request_role(p);
	}
	if (n < 6 || p->data[1] != 0)
		return L7_ROLE_UNKNOWN;
	length = peek_be32(p, 1);
	kind = p->data[0];
	if (kind == 'Q') {
		if (length >= 5 && length + 1 == call && peek_sql_start(p->data[5]))
			return peek_request_role(p);
		return L7_ROLE_UNKNOWN;
	}
	if (kind == 'P') {
		/* statement name (printable, may be empty), NUL, then the SQL */
		if (length < 8 || length + 1 > call)
			return L7_ROLE_UNKNOWN;
#pragma unroll
		for (int i = 5; i < L7_PEEK - 1; i++) {
			if (i + 1 >= n)
				return L7_ROLE_UNKNOWN;
			if (p->data[i] == 0)
				return peek_sql_start(p->data[i + 1]) ? peek_request_role(p)
								      : L7_ROLE_UNKNOWN;
			if (!pg_printable(p->data[i]))
				return L7_ROLE_UNKNOWN;
		}
		return L7_ROLE_UNKNOWN;
	}
	if (kind == 'B') {
		/* portal name, NUL, statement name, NUL (both printable, may be empty); a Bind is
		 * always followed by more messages in the same call */
		int nuls = 0;

		if (length < 12 || length + 1 >= call)
			return L7_ROLE_UNKNOWN;
#pragma unroll
		for (int i = 5; i < L7_PEEK; i++) {
			if (i >= n || nuls >= 2)
				break;
			if (p->data[i] == 0)
				nuls++;
			else if (!pg_printable(p->data[i]))
				return L7_ROLE_UNKNOWN;
		}
		return nuls >= 2 ? peek_request_role(p) : L7_ROLE_UNKNOWN;
	}
	return L7_ROLE_UNKNOWN;
}
