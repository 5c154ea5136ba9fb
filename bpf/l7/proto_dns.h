/* DNS's kernel classifier; mirrored by probewire.l7.protocols.dns.classify.
 * A socket is DNS when a call (a UDP datagram, or a TCP message behind its 2-byte length)
 * starts with a DNS header of a standard query with one question: a query (no answers, no
 * authority, at most one additional record, the EDNS OPT) or a response, and port 53 at the
 * server's end. The port keeps other UDP protocols whose first bytes happen to fit out. */
#pragma once

#include "l7_peek.h"

#define DNS_PORT 53

/* The header at constant offset h (0: UDP, 2: TCP). */
static __always_inline __u8 dns_header(const struct l7_peek *p, __u32 n, const int h)
{
	__u8 flags, response;
	bool requester;

	if (n < h + 13)
		return L7_ROLE_UNKNOWN;
	if (h && peek_be16(p, 0) < 17)
		return L7_ROLE_UNKNOWN;
	flags = p->data[h + 2];
	response = flags >> 7;
	if (((flags >> 3) & 0xf) != 0 || p->data[h + 4] != 0 || p->data[h + 5] != 1)
		return L7_ROLE_UNKNOWN;
	if (!response && ((p->data[h + 3] & 0xf) || p->data[h + 6] || p->data[h + 7] ||
			  p->data[h + 8] || p->data[h + 9] || p->data[h + 10] ||
			  p->data[h + 11] > 1))
		return L7_ROLE_UNKNOWN;
	if (!response && (p->data[h + 3] & 0x40)) /* Z: AD and CD may be set (dig sets AD) */
		return L7_ROLE_UNKNOWN;
	if (p->data[h + 12] > 63)
		return L7_ROLE_UNKNOWN;
	requester = (p->dir == L7_DIR_OUT) != (response != 0);
	if (requester)
		return p->rport == DNS_PORT ? L7_ROLE_CLIENT : L7_ROLE_UNKNOWN;
	return p->lport == DNS_PORT ? L7_ROLE_SERVER : L7_ROLE_UNKNOWN;
}

static __always_inline __u8 dns_classify(const struct l7_peek *p)
{
	__u32 n = peek_len(p);

	if (p->transport == L7_UDP)
		return dns_header(p, n, 0);
	if (p->transport == L7_TCP)
		return dns_header(p, n, 2);
	return L7_ROLE_UNKNOWN;
}
