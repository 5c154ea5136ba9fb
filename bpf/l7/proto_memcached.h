/* memcached's kernel classifier; mirrored by probewire.l7.protocols.memcached.classify.
 * A connection is memcached when a call starts with a text-protocol command: a keyed one
 * ("get ", "set ", "mg ", ...) followed by a key byte, or "version\r\n", "stats", "mn\r\n",
 * "flush_all", "verbosity ". Commands are lower case, so HTTP methods never match. */
#pragma once

#include "l7_peek.h"

/* p's data starts with the constant string s (of length sizeof(s) - 1). */
#define MC_IS(p, n, s) mc_prefix((p), (n), (s), sizeof(s) - 1)

static __always_inline bool mc_prefix(const struct l7_peek *p, __u32 n, const char *s,
				      const int len)
{
	/* Spelled out: constant offsets, and no loop for the optimizer to keep (the longest
	 * word, "flush_all\r\n", has 11 bytes). */
	if (n < len)
		return false;
	if (len > 0 && p->data[0] != (__u8)s[0])
		return false;
	if (len > 1 && p->data[1] != (__u8)s[1])
		return false;
	if (len > 2 && p->data[2] != (__u8)s[2])
		return false;
	if (len > 3 && p->data[3] != (__u8)s[3])
		return false;
	if (len > 4 && p->data[4] != (__u8)s[4])
		return false;
	if (len > 5 && p->data[5] != (__u8)s[5])
		return false;
	if (len > 6 && p->data[6] != (__u8)s[6])
		return false;
	if (len > 7 && p->data[7] != (__u8)s[7])
		return false;
	if (len > 8 && p->data[8] != (__u8)s[8])
		return false;
	if (len > 9 && p->data[9] != (__u8)s[9])
		return false;
	if (len > 10 && p->data[10] != (__u8)s[10])
		return false;
	return len <= 11;
}

#define MC_KEYED(p, n, s) \
	(MC_IS(p, n, s) ? 1 + (n > sizeof(s) - 1 && p->data[sizeof(s) - 1] >= 0x21 && \
			       p->data[sizeof(s) - 1] <= 0x7e) : 0)

static __always_inline __u8 memcached_classify(const struct l7_peek *p)
{
	__u32 n = peek_len(p);
	int keyed;

	if (p->transport != L7_TCP)
		return L7_ROLE_UNKNOWN;
	/* 0: not this word, 1: the word without a key byte, 2: word and key byte */
	keyed = MC_KEYED(p, n, "get ") ?: MC_KEYED(p, n, "gets ") ?: MC_KEYED(p, n, "gat ") ?:
		MC_KEYED(p, n, "gats ") ?: MC_KEYED(p, n, "set ") ?: MC_KEYED(p, n, "add ") ?:
		MC_KEYED(p, n, "replace ") ?: MC_KEYED(p, n, "append ") ?:
		MC_KEYED(p, n, "prepend ") ?: MC_KEYED(p, n, "cas ") ?:
		MC_KEYED(p, n, "delete ") ?: MC_KEYED(p, n, "incr ") ?: MC_KEYED(p, n, "decr ") ?:
		MC_KEYED(p, n, "touch ") ?: MC_KEYED(p, n, "mg ") ?: MC_KEYED(p, n, "ms ") ?:
		MC_KEYED(p, n, "md ") ?: MC_KEYED(p, n, "ma ") ?: MC_KEYED(p, n, "me ");
	if (keyed)
		return keyed == 2 ? peek_request_role(p) : L7_ROLE_UNKNOWN;
	if (MC_IS(p, n, "version\r\n") || MC_IS(p, n, "stats\r\n") || MC_IS(p, n, "stats ") ||
	    MC_IS(p, n, "mn\r\n") || MC_IS(p, n, "flush_all\r\n") || MC_IS(p, n, "flush_all ") ||
	    MC_IS(p, n, "verbosity "))
		return peek_request_role(p);
	return L7_ROLE_UNKNOWN;
}
