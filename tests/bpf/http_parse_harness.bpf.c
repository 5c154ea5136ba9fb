// SPDX-License-Identifier: GPL-2.0
/* Test harness: runs the http family's kernel parsers (bpf/http_parse.h) on bytes handed in
 * through BPF_PROG_TEST_RUN, so tests/bpf/test_http_parse.py can compare them with user space's
 * parsers on random input. Built by the test (clang), never shipped. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "l7/http_parse.h"

char LICENSE[] SEC("license") = "GPL";

struct parse_io {
	__u8 head[HTTP_HEAD_LEN];
	__u32 len;
	__u32 method_in; /* method code path_hash is given */
	__u16 status_in; /* response_bounds: the response's status */
	__u16 head_request; /* response_bounds: the request was a HEAD */
	__u32 numeric; /* path_hash: numeric segments as one */
	/* results */
	__s32 header_end;
	__u32 method;
	__u32 status;
	__s32 resp_header_end;
	__u64 path_hash;
	__u64 resp_end_at;
};

/* The parsers take map memory, as in http.bpf.c (context memory takes constant offsets only). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct parse_io);
} scratch SEC(".maps");

SEC("syscall")
int parse(struct parse_io *ctx)
{
	__u32 zero = 0;
	struct parse_io *io = bpf_map_lookup_elem(&scratch, &zero);

	if (!io)
		return 1;
	__builtin_memcpy(io->head, ctx->head, HTTP_HEAD_LEN);
	io->len = ctx->len;
	ctx->header_end = header_end(io->head, io->len);
	ctx->method = method_of(io->head);
	ctx->status = status_of(io->head);
	ctx->path_hash = path_hash(io->head, io->len, ctx->method_in, ctx->numeric);
	ctx->resp_header_end = response_bounds(io->head, io->len, ctx->status_in,
					       ctx->head_request, &io->resp_end_at);
	ctx->resp_end_at = io->resp_end_at;
	return 0;
}
