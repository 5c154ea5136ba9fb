/* Byte helpers of the kernel classifiers (proto_<name>.h): reads of struct l7_peek at offsets
 * that are constants once the callers' loops are unrolled, so a classifier verifies against
 * any memory the capture layer keeps the peek in (context memory takes constant offsets only). */
#pragma once

#include "l7.h"

/* Valid bytes of the peek (never more than L7_PEEK). */
static __always_inline __u32 peek_len(const struct l7_peek *p)
{
	return p->len > L7_PEEK ? L7_PEEK : p->len;
}

/* Bytes the whole call moved (at least the valid ones). */
static __always_inline __u32 peek_call_len(const struct l7_peek *p)
{
	__u32 n = peek_len(p);

	return p->call_len > n ? p->call_len : n;
}

static __always_inline __u32 peek_be16(const struct l7_peek *p, const int at)
{
	return ((__u32)p->data[at] << 8) | p->data[at + 1];
}

static __always_inline __u32 peek_be32(const struct l7_peek *p, const int at)
{
	return ((__u32)p->data[at] << 24) | ((__u32)p->data[at + 1] << 16) |
	       ((__u32)p->data[at + 2] << 8) | p->data[at + 3];
}

static __always_inline __u32 peek_le24(const struct l7_peek *p, const int at)
{
	return p->data[at] | ((__u32)p->data[at + 1] << 8) | ((__u32)p->data[at + 2] << 16);
}

static __always_inline bool peek_digit(__u8 c)
{
	return c >= '0' && c <= '9';
}

static __always_inline bool peek_alpha(__u8 c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

/* A byte a SQL text may start with: a letter, blank, '(' or a comment's '/' or '-'. */
static __always_inline bool peek_sql_start(__u8 c)
{
	return peek_alpha(c) || c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '(' ||
	       c == '/' || c == '-';
}

/* The role of the process that moved a request (out: it asked; in: it is asked). */
static __always_inline __u8 peek_request_role(const struct l7_peek *p)
{
	return p->dir == L7_DIR_OUT ? L7_ROLE_CLIENT : L7_ROLE_SERVER;
}
