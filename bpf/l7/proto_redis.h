/* Redis's kernel classifier; mirrored by probewire.l7.protocols.redis.classify.
 * A connection is Redis when a call starts with a RESP command: an array of bulk strings,
 * "*<1-5 digits>\r\n$<1-3 digits>\r\n" then a letter (the command name). Replies and inline
 * commands are not used to classify. Each case of digit counts is spelled out, so every
 * offset is a constant. */
#pragma once

#include "l7_peek.h"

/* A run of digits that started before position i ends at i (at most `last`). */
#define REDIS_ENDS_AT(p, n, i, last) ((i) >= (n) || !peek_digit((p)->data[i]) || (i) == (last))

/* "\r\n<letter>" at j: the end of the command name's length. */
static __always_inline bool redis_name_at(const struct l7_peek *p, __u32 n, const int j)
{
	return j + 2 < n && p->data[j] == '\r' && p->data[j + 1] == '\n' &&
	       peek_alpha(p->data[j + 2]);
}

/* "$<1-3 digits>\r\n<letter>" at `at`. */
static __always_inline bool redis_bulk_head(const struct l7_peek *p, __u32 n, const int at)
{
	if (!peek_digit(p->data[at]) || p->data[at] == '0')
		return false;
	if (REDIS_ENDS_AT(p, n, at + 1, at + 3))
		return redis_name_at(p, n, at + 1);
	if (REDIS_ENDS_AT(p, n, at + 2, at + 3))
		return redis_name_at(p, n, at + 2);
	return redis_name_at(p, n, at + 3);
}

/* "\r\n$" at i (the end of the array's length), then the first bulk string's head. */
static __always_inline __u8 redis_after_array(const struct l7_peek *p, __u32 n, const int i)
{
	if (i + 4 >= n || p->data[i] != '\r' || p->data[i + 1] != '\n' || p->data[i + 2] != '$')
		return L7_ROLE_UNKNOWN;
	return redis_bulk_head(p, n, i + 3) ? peek_request_role(p) : L7_ROLE_UNKNOWN;
}

static __always_inline __u8 redis_classify(const struct l7_peek *p)
{
	__u32 n = peek_len(p);

	if (p->transport != L7_TCP || n < 9 || p->data[0] != '*' || !peek_digit(p->data[1]) ||
	    p->data[1] == '0')
		return L7_ROLE_UNKNOWN;
	if (REDIS_ENDS_AT(p, n, 2, 6))
		return redis_after_array(p, n, 2);
	if (REDIS_ENDS_AT(p, n, 3, 6))
		return redis_after_array(p, n, 3);
	if (REDIS_ENDS_AT(p, n, 4, 6))
		return redis_after_array(p, n, 4);
	if (REDIS_ENDS_AT(p, n, 5, 6))
		return redis_after_array(p, n, 5);
	return redis_after_array(p, n, 6);
}
