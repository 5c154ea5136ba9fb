/* The L7 capture layer's constants and shared structs. Enums are read by Python from the
 * object's BTF through a generated module (src/probewire/l7/constants.py, made by
 * scripts/gen_constants.py and checked by tests/unit/test_btf_layouts.py); record structs are
 * checked against their numpy dtypes the same way. */
#pragma once

/* Protocol ids: the index of a protocol's parser in the dispatch PROG_ARRAYs. */
enum l7_proto {
	L7_PROTO_UNKNOWN = 0,
	L7_PROTO_HTTP = 1,
	L7_PROTO_HTTP2 = 2,
	L7_PROTO_POSTGRESQL = 3,
	L7_PROTO_MYSQL = 4,
	L7_PROTO_REDIS = 5,
	L7_PROTO_MEMCACHED = 6,
	L7_PROTO_DNS = 7,
	L7_PROTO_COUNT = 8,
	/* Not protocols: states of a connection whose protocol is not to be parsed. */
	L7_PROTO_NONE = 254, /* no classifier claimed it within its tries */
	L7_PROTO_FILTERED = 255, /* the filter map excludes it */
};

/* Role of the process that owns the socket. */
enum l7_role {
	L7_ROLE_UNKNOWN = 0,
	L7_ROLE_SERVER = 1,
	L7_ROLE_CLIENT = 2,
};

/* Direction of a call's bytes, from that process's point of view. */
enum l7_dir {
	L7_DIR_IN = 1,
	L7_DIR_OUT = 2,
};

enum l7_transport {
	L7_TCP = 6,
	L7_UDP = 17,
};

/* Ring record kinds: the type tag every record starts with. */
enum l7_record {
	L7_RECORD_HTTP = 1, /* struct http_exchange (bpf/l7/proto_http.h) */
	L7_RECORD_DATA = 2, /* struct l7_data: bytes of a connection, for a user-space parser */
	L7_RECORD_CLOSE = 3, /* struct l7_data with no bytes: the connection ended */
};

/* Header flags (l7 header `flags`). */
enum l7_flag {
	L7_FLAG_TLS = 1, /* plaintext seen through the OpenSSL uprobes */
	L7_FLAG_UDP = 2, /* a datagram socket: each call is a whole message */
	L7_FLAG_PREEXISTING = 4, /* first seen mid-stream: opened before the agent looked */
};

/* Coverage counters per protocol (l7_coverage[proto * L7_COVERAGE_COUNT + counter]); for
 * L7_PROTO_UNKNOWN, connections no classifier claimed. */
enum l7_coverage {
	L7_COV_CLASSIFIED = 0, /* connections classified as this protocol */
	L7_COV_UNCLASSIFIED_TLS = 1, /* (UNKNOWN) TLS plaintext whose first bytes none claimed */
	L7_COV_UNCLASSIFIED = 2, /* (UNKNOWN) sockets whose first bytes no classifier claimed */
	L7_COV_TRUNCATED = 3, /* calls larger than the capture (bytes skipped) */
	/* (UNKNOWN) l7_bounded only: data syscalls that moved bytes but whose enter tracepoint
	 * parked no arguments (begun before the agent attached, or pushed out of l7_sys_args);
	 * the fd is not known at the exit, so calls on any file of a traced process count. */
	L7_COV_NO_SYS_ENTER = 4,
	L7_COV_COUNT = 5,
};

/* Bytes of a call a classifier sees (zero padded past `len`). */
#define L7_PEEK 32
/* Calls a connection gets in each direction to be classified, counted where the talk turns
 * (a message boundary in request/response protocols): a connection opened before the agent
 * started is picked up at its next request, and a stream no classifier claims costs one map
 * lookup a call from then on. */
#define L7_MAX_TRIES 8

/* The sizes above, as enumerators so that user space reads them from BTF. */
enum l7_limit {
	L7_LIMIT_PEEK = L7_PEEK,
	L7_LIMIT_MAX_TRIES = L7_MAX_TRIES,
};

/* What a classifier is given: the first bytes one call moved on a connection whose protocol
 * is not known yet. A classifier returns the role (enum l7_role) of the process when the bytes
 * start a message of its protocol, else L7_ROLE_UNKNOWN. It is a pure function of this struct
 * (tests run it on the same bytes as the Python mirror, Protocol.classify). */
struct l7_peek {
	__u8 data[L7_PEEK];
	__u32 len; /* valid bytes in data (the call may have moved more) */
	__u8 dir; /* enum l7_dir */
	__u8 transport; /* enum l7_transport */
	__u16 lport;
	__u16 rport;
	__u16 _pad;
	__u32 call_len; /* bytes the whole call moved (>= len): a message's length field can be
			 * checked against it (0 from older callers: treated as len) */
};

/* The neutral header every L7 ring record starts with: the type tag first, then the protocol,
 * then who saw it on which connection. A macro, not a member struct, so records stay flat
 * (numpy reads each as one structured array with these fields first). */
#define L7_HEADER                                                                              \
	__u16 kind; /* enum l7_record */                                                           \
	__u8 proto; /* enum l7_proto */                                                            \
	__u8 role; /* enum l7_role of the process that saw it */                                   \
	__u32 tgid;                                                                                \
	__u32 tid; /* the thread that made the call (exchanges: that started it) */               \
	__u32 peer_tgid; /* server side: the local client's process (0: remote or not seen) */    \
	__u64 conn_id; /* the socket's address, | 1 for TLS plaintext (see capture.h) */          \
	__u8 family; /* AF_INET or AF_INET6 */                                                     \
	__u8 flags; /* enum l7_flag */                                                             \
	__u16 lport;                                                                               \
	__u16 rport;                                                                               \
	__u16 _hpad;                                                                               \
	__u8 laddr[16];                                                                            \
	__u8 raddr[16]

struct l7_header {
	L7_HEADER;
};

/* Bytes of one connection for a user-space parser (src/probewire/l7/protocols/): the data of one call,
 * or one chunk of it. Variable length: `len` bytes of data follow the fixed part. */
#define L7_CHUNK 8192 /* data bytes a record carries at most (a power of two) */
#define L7_MAX_CHUNKS 32 /* records one call may fill; what is left is `skipped` */
enum l7_data_limit {
	L7_LIMIT_CHUNK = L7_CHUNK,
	L7_LIMIT_MAX_CHUNKS = L7_MAX_CHUNKS,
};

struct l7_data {
	L7_HEADER;
	__u64 ts_ns; /* CLOCK_MONOTONIC, when the call returned */
	__u32 seq; /* per connection and direction, counts every record, so a dropped one shows
		    * as a gap; a close record's is one past all records of both directions */
	__u32 len; /* data bytes that follow */
	__u32 skipped; /* bytes the call moved after these that are not captured */
	__u8 dir; /* enum l7_dir */
	__u8 _pad[3];
};

/* ---- kernel aggregation: exchanges counted in maps, any protocol ---------------------------
 * A protocol whose exchanges can be keyed by an operation user space has named (a hash of the
 * bytes that identify it, e.g. method + path, mapped to an id in l7_ops) counts them in l7_aggs
 * instead of shipping them; the buckets are the exported ones, so user space only adds each
 * key's growth to its series. */
#define L7_DURATION_BOUNDS 14 /* OpenTelemetry's *.duration boundaries */
#define L7_SIZE_BOUNDS 11

struct l7_agg_key {
	__u32 tgid;
	__u32 op; /* user space's operation id (l7_ops value), e.g. an HTTP route */
	__u32 peer_tgid; /* server side: local client process, 0 if remote or unknown */
	__u16 lport; /* server side: the local port (names the service by port rules) */
	__u16 rport; /* client side: the server's port; 0 on the server side */
	__u16 status; /* the protocol's status (HTTP: the status code) */
	__u8 proto;
	__u8 role;
	__u8 method; /* a protocol's sub-operation (HTTP: its method code) */
	__u8 flags; /* l7 header flags (TLS) */
	__u8 pflags; /* protocol flags (HTTP: aborted) */
	__u8 family;
	__u8 laddr[16]; /* server side: local address; zero on the client side */
	__u8 raddr[16]; /* client side: server address; server side: client address */
};

struct l7_agg {
	__u64 count;
	__u64 duration_ns; /* sum */
	__u64 req_body_count; /* exchanges whose request size is known */
	__u64 req_body_bytes; /* sum */
	__u64 resp_body_bytes; /* sum (server side; one observation per exchange) */
	__u64 duration[L7_DURATION_BOUNDS + 1];
	__u64 req_body[L7_SIZE_BOUNDS + 1];
	__u64 resp_body[L7_SIZE_BOUNDS + 1];
};

/* A client connection's local end, so the server side of a connection on this host can name
 * the process at the other end without the ephemeral port in any key. */
struct l7_endpoint {
	__u8 addr[16];
	__u16 port;
	__u8 family;
	__u8 _pad;
};
