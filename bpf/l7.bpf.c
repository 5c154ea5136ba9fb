// SPDX-License-Identifier: GPL-2.0
/* l7 family: the capture layer (bpf/l7/capture.h, dispatch.h) and the protocols it dispatches
 * to. Adding a protocol: its bpf/l7/proto_<name>.h (a classifier, and a parser unless user
 * space parses it: l7_ship_data / l7_close_shipped), an #include and a line in L7_PROTOCOLS
 * below, at the position its classifier is tried in. */
#include "l7/capture.h"
#include "l7/proto_http.h"
#include "l7/proto_http2.h"
#include "l7/proto_postgresql.h"
#include "l7/proto_mysql.h"
#include "l7/proto_redis.h"
#include "l7/proto_memcached.h"
#include "l7/proto_dns.h"

char LICENSE[] SEC("license") = "GPL";

#define L7_PROTOCOLS(X)                                          \
	X(HTTP, http, http_parse, http_close)                    \
	X(HTTP2, http2, http2_parse, http2_close)                 \
	X(POSTGRESQL, postgresql, l7_ship_data, l7_close_shipped) \
	X(MYSQL, mysql, l7_ship_data, l7_close_shipped)           \
	X(REDIS, redis, l7_ship_data, l7_close_shipped)           \
	X(MEMCACHED, memcached, l7_ship_data, l7_close_shipped)   \
	X(DNS, dns, l7_ship_data, l7_close_shipped)

#include "l7/dispatch.h"
