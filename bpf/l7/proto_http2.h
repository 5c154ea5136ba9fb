/* HTTP/2 (and gRPC) on the capture layer: the connection's bytes go to user space, which walks
 * its frames and keeps the HPACK state of each direction (l7/protocols/http2.py). */
#pragma once

#include "capture.h"

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
