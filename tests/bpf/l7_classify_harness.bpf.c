// SPDX-License-Identifier: GPL-2.0
/* Test harness: runs every protocol's kernel classifier (bpf/l7/proto_<name>.h) and the http
 * family's request/status line recognisers on one struct l7_peek handed in through
 * BPF_PROG_TEST_RUN, so tests/bpf/test_l7_classify.py can compare them with the Python
 * classifiers on the same bytes. Built by the test (clang), never shipped. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
/* http_parse.h brings parsers this harness does not call */
#pragma clang diagnostic ignored "-Wunused-function"
#include "l7/http_parse.h"
#include "l7/proto_postgresql.h"
#include "l7/proto_mysql.h"
#include "l7/proto_redis.h"
#include "l7/proto_memcached.h"
#include "l7/proto_dns.h"

char LICENSE[] SEC("license") = "GPL";

struct classify_io {
	struct l7_peek peek;
	__u8 role[L7_PROTO_COUNT]; /* by enum l7_proto */
	__u32 http_method;
	__u32 http_status;
};

/* The classifiers read the peek where the capture layer keeps it: map memory. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_peek);
} peek_scratch SEC(".maps");

SEC("syscall")
int classify(struct classify_io *ctx)
{
	__u32 zero = 0;
	struct l7_peek *p = bpf_map_lookup_elem(&peek_scratch, &zero);

	if (!p)
		return 1;
	__builtin_memcpy(p, &ctx->peek, sizeof(*p));
	ctx->role[L7_PROTO_POSTGRESQL] = postgresql_classify(p);
	ctx->role[L7_PROTO_MYSQL] = mysql_classify(p);
	ctx->role[L7_PROTO_REDIS] = redis_classify(p);
	ctx->role[L7_PROTO_MEMCACHED] = memcached_classify(p);
	ctx->role[L7_PROTO_DNS] = dns_classify(p);
	ctx->http_method = method_of(p->data);
	ctx->http_status = status_of(p->data);
	return 0;
}
