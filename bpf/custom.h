/* custom family: probes declared in config (probes.custom), interpreted by one precompiled
 * object. Each attachment's BPF cookie is the probe's index in custom_specs; the spec says
 * which arguments to read and how to count. Shared by custom.bpf.c and probes/custom.py
 * (whose dtypes tests/unit/test_btf_layouts.py checks against this file's BTF). */
#pragma once

#define CUSTOM_MAX_PROBES 64
#define CUSTOM_MAX_LABELS 8
#define CUSTOM_MAX_VALUES 4
#define CUSTOM_MAX_OFFSETS 4
#define CUSTOM_MAX_BOUNDS 16
/* Label bytes of one key: an integer label takes 8, a str label its max_len. */
#define CUSTOM_LABEL_BYTES 64
/* Nested calls of one probe on one thread (recursion) that keep their own entry. */
#define CUSTOM_MAX_DEPTH 4
/* CPython: bytes of co_name compared, of a module's file suffix, of co_filename read. */
#define CUSTOM_PY_NAME 64
#define CUSTOM_PY_SUFFIX 64
#define CUSTOM_PY_SUFFIXES 2
#define CUSTOM_PY_PATH 256
/* Float values are counted in fixed point: value * 2^16 as an s64 (BPF has no floating point). */
#define CUSTOM_FIXED_SHIFT 16

enum custom_type {
	CUSTOM_U8 = 1,
	CUSTOM_U16,
	CUSTOM_U32,
	CUSTOM_U64,
	CUSTOM_S8,
	CUSTOM_S16,
	CUSTOM_S32,
	CUSTOM_S64,
	CUSTOM_F32,
	CUSTOM_F64,
	CUSTOM_BOOL,
	CUSTOM_STR,
};

/* Where arguments are: x86-64 System V registers, Go's register ABI, or USDT operand specs. */
enum custom_abi {
	CUSTOM_ABI_SYSV = 0,
	CUSTOM_ABI_GO = 1,
	CUSTOM_ABI_USDT = 2,
};

enum custom_op {
	CUSTOM_OP_NONE = 0,
	CUSTOM_OP_EQ,
	CUSTOM_OP_NE,
	CUSTOM_OP_LT,
	CUSTOM_OP_LE,
	CUSTOM_OP_GT,
	CUSTOM_OP_GE,
};

enum custom_result {
	CUSTOM_RESULT_NONE = 0,
	CUSTOM_RESULT_OK = 1,
	CUSTOM_RESULT_ERROR = 2,
};

/* Kernel-side losses, per probe: probewire_custom_errors_total{probe,reason}. */
enum custom_error {
	CUSTOM_ERR_MAP_FULL = 0, /* custom_stats had no room for a new label set */
	CUSTOM_ERR_READ,	 /* an argument's memory could not be read (the call still counts) */
	CUSTOM_ERR_DEPTH,	 /* recursion deeper than CUSTOM_MAX_DEPTH: the deepest calls not timed */
	CUSTOM_ERR_NO_ENTRY,	 /* a return whose entry was not seen (attached mid-call, evicted) */
	CUSTOM_N_ERRORS,
};

#define CUSTOM_AT_RETURN (1U << 0) /* count at the return: duration or result wanted */
#define CUSTOM_PYTHON (1U << 1)	   /* match CPython's function__entry/return by name and file */
#define CUSTOM_MATCH_SP (1U << 2)  /* pair a return with its entry by stack pointer (sysv) */

/* One argument read: the register itself (n_offsets == 0), or memory at offsets from it, every
 * offset but the last dereferencing a pointer. */
struct custom_field {
	__u8 arg;
	__u8 type;	/* enum custom_type */
	__u8 n_offsets;
	__u8 key_at;	/* labels: where the value goes in custom_key.labels */
	__u8 key_size;	/* labels: bytes it takes there (str: at most this many, NUL included) */
	__u8 _pad[3];
	__s64 offsets[CUSTOM_MAX_OFFSETS];
};

struct custom_value_spec {
	struct custom_field field;
	__u32 n_bounds;
	__u32 is_signed;  /* compare bounds as s64 (signed ints, floats in fixed point) or u64 */
	__s64 bounds[CUSTOM_MAX_BOUNDS];
};

struct custom_spec {
	__u32 flags;
	__u8 abi;	    /* enum custom_abi */
	__u8 n_labels;
	__u8 n_values;
	__u8 result_op;	    /* enum custom_op; NONE: no result label */
	__u8 result_type;   /* enum custom_type the return register is read as */
	__u8 n_duration_bounds;
	__u8 py_name_len;
	__u8 py_n_suffixes; /* 0: any file (module __main__) */
	__u8 py_suffix_len[CUSTOM_PY_SUFFIXES];
	__u8 _pad[10];
	__s64 result_operand;
	__u64 duration_bounds_ns[CUSTOM_MAX_BOUNDS];
	struct custom_field labels[CUSTOM_MAX_LABELS];
	struct custom_value_spec values[CUSTOM_MAX_VALUES];
	char py_name[CUSTOM_PY_NAME];
	char py_suffix[CUSTOM_PY_SUFFIXES][CUSTOM_PY_SUFFIX];
};

/* One series before user space names the process: probe, process, result, label bytes. */
struct custom_key {
	__u32 tgid;
	__u16 probe;
	__u8 result;	/* enum custom_result */
	__u8 _pad;
	__u8 labels[CUSTOM_LABEL_BYTES];
};

/* Buckets are Prometheus' le: bucket i counts values <= bound i, bucket n_bounds the rest. */
struct custom_stats {
	__u64 calls;
	__u64 duration_ns_sum;
	__u64 duration_buckets[CUSTOM_MAX_BOUNDS + 1];
	__s64 value_sum[CUSTOM_MAX_VALUES];
	__u64 value_buckets[CUSTOM_MAX_VALUES][CUSTOM_MAX_BOUNDS + 1];
};

/* What an entry leaves for its return: arguments are gone from the registers by then. */
struct custom_frame {
	__u64 start_ns;
	__u64 sp;	/* stack pointer at entry (CUSTOM_MATCH_SP) */
	__s64 values[CUSTOM_MAX_VALUES];
	__u8 labels[CUSTOM_LABEL_BYTES];
};

struct custom_call_key {
	__u64 thread;	/* pid_tgid, or under abi go the goroutine (R14), which moves between threads */
	__u32 tgid;
	__u32 probe;
};

struct custom_calls {
	__u32 depth;
	__u32 _pad;
	struct custom_frame frames[CUSTOM_MAX_DEPTH];
};
