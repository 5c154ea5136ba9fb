// SPDX-License-Identifier: GPL-2.0
/* custom family: one precompiled object for every probe in probes.custom. A probe's spec lives
 * in custom_specs at the index its attachments carry as BPF cookie (USDT: as USDT cookie), so
 * adding a probe needs no compiler, only a map update and an attach. Calls are counted into
 * per-CPU custom_stats keyed by (process, probe, result, label bytes): nothing goes through a
 * ring in steady state; user space reads the map at scrape time. */
#include "common.h"
#include <bpf/usdt.bpf.h>
#include "custom.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CUSTOM_MAX_PROBES);
	__type(key, __u32);
	__type(value, struct custom_spec);
} custom_specs SEC(".maps");

/* <probe>_calls_total, <probe>_duration_seconds, <probe>_<value>: one entry per label set and
 * process; user space deletes the entries of exited processes after reading them. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct custom_key);
	__type(value, struct custom_stats);
} custom_stats SEC(".maps");

/* Calls in flight, per thread (goroutine under abi go) and probe. LRU: a thread that exits
 * mid-call leaves an entry no return will ever remove. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct custom_call_key);
	__type(value, struct custom_calls);
} custom_calls SEC(".maps");

/* probewire_custom_errors_total{probe,reason}: index probe * CUSTOM_N_ERRORS + reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CUSTOM_MAX_PROBES * CUSTOM_N_ERRORS);
	__type(key, __u32);
	__type(value, __u64);
} custom_errors SEC(".maps");

/* Working memory, too big for the 512-byte stack. The slack after the key lets a label land at
 * any key_at with any key_size and still be inside the value, as the verifier wants. */
struct custom_scratch {
	struct custom_key key;
	__u8 key_slack[CUSTOM_LABEL_BYTES];
	struct custom_frame frame;
	struct custom_calls calls;
	char py_name[CUSTOM_PY_NAME];
	char py_path[CUSTOM_PY_PATH * 2];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct custom_scratch);
} custom_scratch SEC(".maps");

/* A zeroed custom_stats to insert new keys with (never written). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct custom_stats);
} custom_zero SEC(".maps");

#define S64_MAX 0x7fffffffffffffffLL

static __always_inline void count_error(__u32 probe, __u32 reason)
{
	__u32 idx = probe * CUSTOM_N_ERRORS + reason;
	__u64 *n = bpf_map_lookup_elem(&custom_errors, &idx);

	if (n)
		*n += 1;
}

/* IEEE 754 bits -> value * 2^CUSTOM_FIXED_SHIFT, saturating; denormals count as 0. */
static __always_inline __s64 f64_fixed(__u64 bits)
{
	__u64 mant = (bits & ((1ULL << 52) - 1)) | (1ULL << 52);
	int exp = (bits >> 52) & 0x7ff;
	int shift = exp - 1075 + CUSTOM_FIXED_SHIFT;
	__s64 v;

	if (exp == 0)
		return 0;
	if (exp == 0x7ff || shift > 10) /* 53 mantissa bits + shift must stay below bit 63 */
		v = S64_MAX;
	else if (shift >= 0)
		v = mant << shift;
	else if (shift > -64)
		v = mant >> -shift;
	else
		v = 0;
	return (bits >> 63) ? -v : v;
}

static __always_inline __s64 f32_fixed(__u32 bits)
{
	__u64 mant = (bits & ((1U << 23) - 1)) | (1U << 23);
	int exp = (bits >> 23) & 0xff;
	int shift = exp - 150 + CUSTOM_FIXED_SHIFT;
	__s64 v;

	if (exp == 0)
		return 0;
	if (exp == 0xff || shift > 39)
		v = S64_MAX;
	else if (shift >= 0)
		v = mant << shift;
	else if (shift > -64)
		v = mant >> -shift;
	else
		v = 0;
	return (bits >> 31) ? -v : v;
}

/* Raw register or memory bits -> the number the spec's type means, as 64 bits. */
static __always_inline __u64 normalize(__u64 v, __u8 type)
{
	switch (type) {
	case CUSTOM_U8:
		return v & 0xff;
	case CUSTOM_U16:
		return v & 0xffff;
	case CUSTOM_U32:
		return v & 0xffffffff;
	case CUSTOM_S8:
		return (__s64)(__s8)v;
	case CUSTOM_S16:
		return (__s64)(__s16)v;
	case CUSTOM_S32:
		return (__s64)(__s32)v;
	case CUSTOM_BOOL:
		return (v & 0xff) != 0;
	case CUSTOM_F32:
		return f32_fixed((__u32)v);
	case CUSTOM_F64:
		return f64_fixed(v);
	default:
		return v;
	}
}

static __always_inline __u32 type_size(__u8 type)
{
	switch (type) {
	case CUSTOM_U8:
	case CUSTOM_S8:
	case CUSTOM_BOOL:
		return 1;
	case CUSTOM_U16:
	case CUSTOM_S16:
		return 2;
	case CUSTOM_U32:
	case CUSTOM_S32:
	case CUSTOM_F32:
		return 4;
	default:
		return 8;
	}
}

/* A pt_regs field by a load at a constant offset. Through C, clang turns a switch over
 * registers into one load at a computed offset, and the verifier refuses a moved ctx pointer. */
#define CTX_REG(ctx, reg)                                                              \
	({                                                                             \
		__u64 __v;                                                             \
		asm volatile("%0 = *(u64 *)(%1 + %2)"                                  \
			     : "=r"(__v)                                               \
			     : "r"(ctx), "i"(__builtin_offsetof(struct pt_regs, reg))); \
		__v;                                                                   \
	})

/* Argument `i` as the call left it: System V and Go pass integers in registers (floats are in
 * SSE registers, which pt_regs does not hold: config requires offsets for them); USDT operands
 * are described by the note and decoded by libbpf's usdt.bpf.h. */
static __always_inline bool reg_arg(struct pt_regs *ctx, __u8 abi, __u32 i, __u64 *out)
{
	long v = 0;

	if (abi == CUSTOM_ABI_USDT) {
		if (bpf_usdt_arg(ctx, i, &v))
			return false;
		*out = v;
		return true;
	}
	if (abi == CUSTOM_ABI_GO) {
		switch (i) {
		case 0: *out = CTX_REG(ctx, ax); return true;
		case 1: *out = CTX_REG(ctx, bx); return true;
		case 2: *out = CTX_REG(ctx, cx); return true;
		case 3: *out = CTX_REG(ctx, di); return true;
		case 4: *out = CTX_REG(ctx, si); return true;
		case 5: *out = CTX_REG(ctx, r8); return true;
		case 6: *out = CTX_REG(ctx, r9); return true;
		case 7: *out = CTX_REG(ctx, r10); return true;
		case 8: *out = CTX_REG(ctx, r11); return true;
		default: return false;
		}
	}
	switch (i) {
	case 0: *out = CTX_REG(ctx, di); return true;
	case 1: *out = CTX_REG(ctx, si); return true;
	case 2: *out = CTX_REG(ctx, dx); return true;
	case 3: *out = CTX_REG(ctx, cx); return true;
	case 4: *out = CTX_REG(ctx, r8); return true;
	case 5: *out = CTX_REG(ctx, r9); return true;
	default: return false;
	}
}

/* One field: a number into *out, or (str) the bytes into dst, at most dst_size with the NUL. */
static __always_inline bool read_field(struct pt_regs *ctx, __u8 abi, const struct custom_field *f,
				       __u64 *out, __u8 *dst, __u32 dst_size)
{
	__u32 n = f->n_offsets, i;
	__u64 v = 0, addr;

	if (!reg_arg(ctx, abi, f->arg, &v))
		return false;
	if (n == 0) {
		if (f->type == CUSTOM_STR)
			return dst && bpf_probe_read_user_str(dst, dst_size, (void *)v) > 0;
		*out = normalize(v, f->type);
		return true;
	}
	for (i = 0; i < CUSTOM_MAX_OFFSETS - 1; i++) {
		if (i + 1 >= n)
			break;
		if (bpf_probe_read_user(&v, sizeof(v), (void *)(v + f->offsets[i])))
			return false;
	}
	addr = v + f->offsets[(n - 1) & (CUSTOM_MAX_OFFSETS - 1)];
	if (f->type == CUSTOM_STR)
		return dst && bpf_probe_read_user_str(dst, dst_size, (void *)addr) > 0;
	v = 0;
	switch (type_size(f->type)) {
	case 1:
		if (bpf_probe_read_user(&v, 1, (void *)addr))
			return false;
		break;
	case 2:
		if (bpf_probe_read_user(&v, 2, (void *)addr))
			return false;
		break;
	case 4:
		if (bpf_probe_read_user(&v, 4, (void *)addr))
			return false;
		break;
	default:
		if (bpf_probe_read_user(&v, 8, (void *)addr))
			return false;
	}
	*out = normalize(v, f->type);
	return true;
}

/* Labels into s->key.labels, values into s->frame.values. A field that cannot be read keeps
 * zero (labels: the empty value) and is counted; the call itself still counts. */
static __always_inline void read_args(struct pt_regs *ctx, const struct custom_spec *spec,
				      __u32 probe, struct custom_scratch *s)
{
	__u32 i;

	for (i = 0; i < CUSTOM_MAX_LABELS; i++) {
		const struct custom_field *f = &spec->labels[i];
		__u32 at = f->key_at & (CUSTOM_LABEL_BYTES - 1);
		__u32 size = f->key_size;
		__u64 v = 0;

		if (i >= spec->n_labels)
			break;
		if (size < 1 || size > CUSTOM_LABEL_BYTES)
			size = 8;
		if (!read_field(ctx, spec->abi, f, &v, &s->key.labels[at], size)) {
			count_error(probe, CUSTOM_ERR_READ);
			continue;
		}
		if (f->type != CUSTOM_STR)
			__builtin_memcpy(&s->key.labels[at], &v, sizeof(v));
	}
	for (i = 0; i < CUSTOM_MAX_VALUES; i++) {
		__u64 v = 0;

		s->frame.values[i] = 0;
		if (i >= spec->n_values)
			continue;
		if (!read_field(ctx, spec->abi, &spec->values[i].field, &v, NULL, 0)) {
			count_error(probe, CUSTOM_ERR_READ);
			continue;
		}
		s->frame.values[i] = v;
	}
}

static __always_inline __u32 bucket_u64(const __u64 *bounds, __u32 n, __u64 v)
{
	__u32 i;

	for (i = 0; i < CUSTOM_MAX_BOUNDS; i++) {
		if (i >= n || v <= bounds[i])
			break;
	}
	return i > CUSTOM_MAX_BOUNDS ? CUSTOM_MAX_BOUNDS : i;
}

static __always_inline __u32 bucket_value(const struct custom_value_spec *vs, __s64 v)
{
	__u32 i;

	for (i = 0; i < CUSTOM_MAX_BOUNDS; i++) {
		if (i >= vs->n_bounds)
			break;
		if (vs->is_signed ? v <= vs->bounds[i] : (__u64)v <= (__u64)vs->bounds[i])
			break;
	}
	return i > CUSTOM_MAX_BOUNDS ? CUSTOM_MAX_BOUNDS : i;
}

static __always_inline void count_call(const struct custom_spec *spec, __u32 probe,
				       const struct custom_key *key, const __s64 *values,
				       __u64 duration_ns, bool timed)
{
	struct custom_stats *st = bpf_map_lookup_elem(&custom_stats, key);
	__u32 zero = 0, j, b;

	if (!st) {
		struct custom_stats *empty = bpf_map_lookup_elem(&custom_zero, &zero);

		if (!empty)
			return;
		bpf_map_update_elem(&custom_stats, key, empty, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&custom_stats, key);
		if (!st) {
			count_error(probe, CUSTOM_ERR_MAP_FULL);
			return;
		}
	}
	st->calls += 1;
	if (timed) {
		st->duration_ns_sum += duration_ns;
		b = bucket_u64(spec->duration_bounds_ns, spec->n_duration_bounds, duration_ns);
		st->duration_buckets[b] += 1;
	}
	for (j = 0; j < CUSTOM_MAX_VALUES; j++) {
		if (j >= spec->n_values)
			break;
		st->value_sum[j] += values[j];
		b = bucket_value(&spec->values[j], values[j]);
		st->value_buckets[j][b] += 1;
	}
}

/* Does co_filename end with one of the module's file suffixes, at a path component? */
static __always_inline bool suffix_match(const char *path, __u32 len, const char *suffix,
					 __u32 slen)
{
	__u32 start, j;

	if (slen == 0 || slen > len || slen > CUSTOM_PY_SUFFIX)
		return false;
	start = len - slen;
	if (start > 0 && path[(start - 1) & (CUSTOM_PY_PATH * 2 - 1)] != '/')
		return false;
	for (j = 0; j < CUSTOM_PY_SUFFIX; j++) {
		if (j >= slen)
			break;
		if (path[(start + j) & (CUSTOM_PY_PATH * 2 - 1)] != suffix[j])
			return false;
	}
	return true;
}

/* CPython's function__entry/function__return pass (co_filename, co_name, line): the probe fires
 * for every Python call in the process, so the name is compared before anything else. */
static __always_inline bool python_match(struct pt_regs *ctx, const struct custom_spec *spec,
					 struct custom_scratch *s)
{
	long file = 0, name = 0;
	__u32 len, i, k;
	int n;

	if (bpf_usdt_arg(ctx, 1, &name))
		return false;
	n = bpf_probe_read_user_str(s->py_name, CUSTOM_PY_NAME, (void *)name);
	if (n <= 0 || (__u32)(n - 1) != spec->py_name_len)
		return false;
	for (i = 0; i < CUSTOM_PY_NAME; i++) {
		if (i >= spec->py_name_len)
			break;
		if (s->py_name[i] != spec->py_name[i])
			return false;
	}
	if (!spec->py_n_suffixes)
		return true;
	if (bpf_usdt_arg(ctx, 0, &file))
		return false;
	n = bpf_probe_read_user_str(s->py_path, CUSTOM_PY_PATH, (void *)file);
	if (n <= 0)
		return false;
	len = (__u32)(n - 1) & (CUSTOM_PY_PATH - 1);
	for (k = 0; k < CUSTOM_PY_SUFFIXES; k++) {
		if (k >= spec->py_n_suffixes)
			break;
		if (suffix_match(s->py_path, len, spec->py_suffix[k], spec->py_suffix_len[k]))
			return true;
	}
	return false;
}

static __always_inline __u64 thread_of(struct pt_regs *ctx, const struct custom_spec *spec,
				       __u64 pid_tgid)
{
	/* Go's ABIInternal keeps the running goroutine in R14; a goroutine may resume on another
	 * thread between its entry and its return. */
	return spec->abi == CUSTOM_ABI_GO ? CTX_REG(ctx, r14) : pid_tgid;
}

static __always_inline bool result_ok(const struct custom_spec *spec, __u64 rc)
{
	__s64 v = normalize(rc, spec->result_type), want = spec->result_operand;
	bool is_unsigned = spec->result_type == CUSTOM_U64 || spec->result_type == CUSTOM_U32 ||
			   spec->result_type == CUSTOM_U16 || spec->result_type == CUSTOM_U8;

	switch (spec->result_op) {
	case CUSTOM_OP_EQ:
		return v == want;
	case CUSTOM_OP_NE:
		return v != want;
	case CUSTOM_OP_LT:
		return is_unsigned ? (__u64)v < (__u64)want : v < want;
	case CUSTOM_OP_LE:
		return is_unsigned ? (__u64)v <= (__u64)want : v <= want;
	case CUSTOM_OP_GT:
		return is_unsigned ? (__u64)v > (__u64)want : v > want;
	default:
		return is_unsigned ? (__u64)v >= (__u64)want : v >= want;
	}
}

/* calls->frames[i], with an index the verifier sees bounded. */
static __always_inline struct custom_frame *frame_at(struct custom_calls *calls, __u32 i)
{
	__u64 idx = i;

	/* In assembly: clang drops a C mask it can prove redundant, and the verifier, which
	 * tracks less than clang, then sees an unbounded index. */
	asm volatile("%0 &= %1" : "+r"(idx) : "i"(CUSTOM_MAX_DEPTH - 1));
	return &calls->frames[idx];
}

static __always_inline int custom_enter(struct pt_regs *ctx, __u32 probe)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid(), sp = CTX_REG(ctx, sp);
	__u32 tgid = pid_tgid >> 32, zero = 0, d, i;
	struct custom_call_key ck = {};
	struct custom_spec *spec;
	struct custom_scratch *s;
	struct custom_calls *calls;
	struct custom_frame *f;

	if (!is_traced_task(tgid, 0, 0))
		return 0;
	spec = bpf_map_lookup_elem(&custom_specs, &probe);
	s = bpf_map_lookup_elem(&custom_scratch, &zero);
	if (!spec || !s)
		return 0;
	if ((spec->flags & CUSTOM_PYTHON) && !python_match(ctx, spec, s))
		return 0;
	__builtin_memset(&s->key, 0, sizeof(s->key));
	s->key.tgid = tgid;
	s->key.probe = probe;
	read_args(ctx, spec, probe, s);
	if (!(spec->flags & CUSTOM_AT_RETURN)) {
		count_call(spec, probe, &s->key, s->frame.values, 0, false);
		return 0;
	}
	ck.thread = thread_of(ctx, spec, pid_tgid);
	ck.tgid = tgid;
	ck.probe = probe;
	calls = bpf_map_lookup_elem(&custom_calls, &ck);
	if (!calls) {
		s->calls.depth = 0;
		bpf_map_update_elem(&custom_calls, &ck, &s->calls, BPF_NOEXIST);
		calls = bpf_map_lookup_elem(&custom_calls, &ck);
		if (!calls)
			return 0;
	}
	d = calls->depth;
	if (spec->flags & CUSTOM_MATCH_SP) {
		/* Frames at or below this stack pointer belong to calls that left without
		 * returning (longjmp, a C++ exception): this call reuses their stack. */
		for (i = 0; i < CUSTOM_MAX_DEPTH; i++) {
			if (d == 0 || d > CUSTOM_MAX_DEPTH || frame_at(calls, d - 1)->sp > sp)
				break;
			d--;
		}
	}
	if (d >= CUSTOM_MAX_DEPTH) {
		count_error(probe, CUSTOM_ERR_DEPTH);
		calls->depth = d + 1;
		return 0;
	}
	f = frame_at(calls, d);
	f->sp = sp;
	__builtin_memcpy(f->labels, s->key.labels, sizeof(f->labels));
	__builtin_memcpy(f->values, s->frame.values, sizeof(f->values));
	calls->depth = d + 1;
	/* Last, so the time spent here is not the function's. */
	f->start_ns = bpf_ktime_get_ns();
	return 0;
}

static __always_inline int custom_exit(struct pt_regs *ctx, __u32 probe, bool python)
{
	__u64 now = bpf_ktime_get_ns(), pid_tgid = bpf_get_current_pid_tgid(), sp = CTX_REG(ctx, sp);
	__u32 tgid = pid_tgid >> 32, zero = 0, d, i;
	struct custom_call_key ck = {};
	struct custom_spec *spec;
	struct custom_scratch *s;
	struct custom_calls *calls;
	struct custom_frame *f;
	__u64 want_sp;

	if (!is_traced_task(tgid, 0, 0))
		return 0;
	spec = bpf_map_lookup_elem(&custom_specs, &probe);
	s = bpf_map_lookup_elem(&custom_scratch, &zero);
	if (!spec || !s || !(spec->flags & CUSTOM_AT_RETURN))
		return 0;
	if (python && !python_match(ctx, spec, s))
		return 0;
	ck.thread = thread_of(ctx, spec, pid_tgid);
	ck.tgid = tgid;
	ck.probe = probe;
	calls = bpf_map_lookup_elem(&custom_calls, &ck);
	if (!calls || calls->depth == 0) {
		if (python) {
			/* CPython 3.11 fires function__return but never function__entry (CPython
			 * gh-98894): the call counts here, untimed. */
			__builtin_memset(&s->key, 0, sizeof(s->key));
			s->key.tgid = tgid;
			s->key.probe = probe;
			__builtin_memset(s->frame.values, 0, sizeof(s->frame.values));
			count_call(spec, probe, &s->key, s->frame.values, 0, false);
		} else {
			count_error(probe, CUSTOM_ERR_NO_ENTRY);
		}
		return 0;
	}
	d = calls->depth;
	if (spec->flags & CUSTOM_MATCH_SP) {
		/* A uretprobe runs after `ret` popped the return address the entry saw at sp. */
		want_sp = sp - 8;
		for (i = 0; i < CUSTOM_MAX_DEPTH; i++) {
			if (d == 0 || d > CUSTOM_MAX_DEPTH || frame_at(calls, d - 1)->sp >= want_sp)
				break;
			d--;
		}
		if (d == 0 || (d <= CUSTOM_MAX_DEPTH && frame_at(calls, d - 1)->sp != want_sp)) {
			calls->depth = d;
			count_error(probe, CUSTOM_ERR_NO_ENTRY);
			return 0;
		}
	}
	d -= 1;
	calls->depth = d;
	if (d >= CUSTOM_MAX_DEPTH) {
		count_error(probe, CUSTOM_ERR_DEPTH);
		return 0;
	}
	f = frame_at(calls, d);
	__builtin_memset(&s->key, 0, sizeof(s->key));
	s->key.tgid = tgid;
	s->key.probe = probe;
	__builtin_memcpy(s->key.labels, f->labels, sizeof(s->key.labels));
	__builtin_memcpy(s->frame.values, f->values, sizeof(s->frame.values));
	if (spec->result_op != CUSTOM_OP_NONE)
		s->key.result = result_ok(spec, CTX_REG(ctx, ax)) ? CUSTOM_RESULT_OK
								  : CUSTOM_RESULT_ERROR;
	count_call(spec, probe, &s->key, s->frame.values, now - f->start_ns, true);
	return 0;
}

/* A function's entry (uprobe at its first instruction; under abi go after the stack check). */
SEC("uprobe")
int custom_entry(struct pt_regs *ctx)
{
	return custom_enter(ctx, (__u32)bpf_get_attach_cookie(ctx));
}

/* A function's return: a uretprobe, or under abi go a uprobe on each RET instruction
 * (uretprobes rewrite the return address on the stack, which Go moves when it grows). */
SEC("uprobe")
int custom_return(struct pt_regs *ctx)
{
	return custom_exit(ctx, (__u32)bpf_get_attach_cookie(ctx), false);
}

/* A USDT probe: counted where it fires; CPython's function__entry opens a call. */
SEC("usdt")
int custom_usdt(struct pt_regs *ctx)
{
	return custom_enter(ctx, (__u32)bpf_usdt_cookie(ctx));
}

/* CPython's function__return: closes the call its function__entry opened. */
SEC("usdt")
int custom_usdt_return(struct pt_regs *ctx)
{
	return custom_exit(ctx, (__u32)bpf_usdt_cookie(ctx), true);
}
