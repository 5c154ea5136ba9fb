/* The L7 capture layer's constants, shared by every proto_<name>.h and read by Python from a
 * module generated from this object's BTF (src/probewire/l7/constants.py). */
#pragma once

/* Protocol ids: the index of a protocol's parser in the dispatch PROG_ARRAY. */
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

/* Bytes of a call a classifier sees (zero padded past `len`). */
#define L7_PEEK 32

/* What a classifier is given: the first bytes one call moved on a connection whose protocol
 * is not known yet. A classifier returns the role (enum l7_role) of the process when the bytes
 * start a message of its protocol, else L7_ROLE_UNKNOWN. It must be a pure function of this
 * struct (tests run it on the same bytes as the Python mirror, Protocol.classify). */
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
