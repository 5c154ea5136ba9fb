// SPDX-License-Identifier: GPL-2.0
/* Ring flood for bench/ring_flood.py: a SEC("syscall") program, run by BPF_PROG_TEST_RUN, that
 * writes `count` records into the `events` ring exactly as probewire's probes do (reserve, fill,
 * submit with wakeup_flags, a full ring drops and counts), cycling through TEMPLATES records
 * that user space put in the `templates` array. The agent's real reader drains the ring. */
#include "common.h"

#ifndef RECORD_SIZE
#error "RECORD_SIZE (the record dtype's itemsize) is passed by bench/ring_flood.py"
#endif
#define TEMPLATES 4096 /* a power of two */

struct record {
	__u8 bytes[RECORD_SIZE];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TEMPLATES);
	__type(key, __u32);
	__type(value, struct record);
} templates SEC(".maps");

struct flood_args {
	__u32 count;   /* in: records to write */
	__u32 first;   /* in: template index of the first one */
	__u32 written; /* out */
	__u32 dropped; /* out: the ring was full */
};

static long write_one(__u32 i, struct flood_args *args)
{
	__u32 key = (args->first + i) & (TEMPLATES - 1);
	struct record *tmpl = bpf_map_lookup_elem(&templates, &key);
	struct record *rec;

	if (!tmpl)
		return 1;
	rec = RESERVE_OR_DROP(struct record);
	if (!rec) {
		args->dropped++;
		return 0;
	}
	bpf_probe_read_kernel(rec, sizeof(*rec), tmpl);
	bpf_ringbuf_submit(rec, wakeup_flags(&events, sizeof(*rec), true));
	args->written++;
	return 0;
}

SEC("syscall")
int flood(struct flood_args *ctx)
{
	struct flood_args args = { .count = ctx->count, .first = ctx->first };

	bpf_loop(args.count, write_one, &args, 0);
	ctx->written = args.written;
	ctx->dropped = args.dropped;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
