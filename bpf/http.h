/* Records of the http family, shared by http.bpf.c and checked against
 * src/probewire/probes/http.py through the object's BTF. */
#pragma once

#define HTTP_HEAD_LEN 256 /* bytes of each message head kept (request line, headers) */
#define HTTP_APPEND_CHUNK 64 /* later reads append at most this much to a head */

#define HTTP_ROLE_SERVER 1
#define HTTP_ROLE_CLIENT 2

/* Methods the kernel recognises at the start of a buffer (0: see the head). */
#define HTTP_GET 1
#define HTTP_POST 2
#define HTTP_PUT 3
#define HTTP_DELETE 4
#define HTTP_HEAD 5
#define HTTP_PATCH 6
#define HTTP_OPTIONS 7
#define HTTP_CONNECT 8
#define HTTP_TRACE 9

#define HTTP_FLAG_ABORTED (1 << 0) /* connection closed before the response started */
#define HTTP_FLAG_PIPELINED (1 << 1) /* not the first request of its read: parse the head */
#define HTTP_FLAG_TLS (1 << 2) /* plaintext seen through OpenSSL uprobes */

#define HTTP_RECORD_EXCHANGE 1

/* One request/response exchange. Server side: emitted when the response is complete (the
 * server reads again, answers the next pipelined request, or closes). Client side: emitted
 * when the response starts (status known), so idle pooled connections never hold it back. */
struct http_exchange {
	__u32 kind;
	__u32 tgid;
	__u8 role;
	__u8 method;
	__u16 status; /* 0 when aborted */
	__u8 family;
	__u8 flags;
	__u16 pipe_idx; /* n-th request found in the same request head */
	__u64 start_ns; /* server: request's first byte read; client: request write began */
	__u64 end_ns; /* server: last response byte written; client: response's first read */
	__u64 req_bytes; /* request bytes on the wire (head and body) */
	__u64 resp_bytes; /* response bytes (server: all of them; client: the first read) */
	__u64 conn_id;
	__u16 lport;
	__u16 rport;
	__u16 req_head_len;
	__u16 resp_head_len;
	__u32 resp_first_write; /* length of the response's first write (its header block) */
	__u32 tid; /* thread that started the exchange: parents client calls made while serving */
	__u32 peer_tgid; /* server side: the local client's process (0: remote or not yet seen) */
	__s32 resp_header_end; /* server side: the response head's CRLFCRLF end, -1 if not in it */
	__u64 path_hash; /* of the request path (aggregation on): user space maps it to a route */
	__u8 laddr[16];
	__u8 raddr[16];
	__u8 req_head[HTTP_HEAD_LEN];
	__u8 resp_head[HTTP_HEAD_LEN];
};

/* ---- In-kernel aggregation --------------------------------------------------------------
 * An exchange whose path user space has already templated (its hash is in http_routes) is
 * counted in http_aggs instead of being shipped: the buckets below are the exported ones, so
 * user space only adds each key's growth to its series. Everything else (a new path, a
 * pipelined request, an unknown method, a full map, or spans wanted for every exchange) goes
 * through the ring as an http_exchange record. */
#define HTTP_DURATION_BOUNDS 14 /* OpenTelemetry's http.*.request.duration boundaries */
#define HTTP_SIZE_BOUNDS 11
#define HTTP_PATH_MAX 128 /* path bytes hashed; user space templates the same bytes */

struct http_agg_key {
	__u32 tgid;
	__u32 route; /* user space's route id (http_routes value) */
	__u32 peer_tgid; /* server side: local client process, 0 if remote or unknown */
	__u16 lport; /* server side: the local port (names the service by port rules) */
	__u16 rport; /* client side: the server's port; 0 on the server side */
	__u16 status;
	__u8 role;
	__u8 method;
	__u8 flags; /* HTTP_FLAG_TLS, HTTP_FLAG_ABORTED */
	__u8 family;
	__u16 _pad;
	__u8 laddr[16]; /* server side: local address; zero on the client side */
	__u8 raddr[16]; /* client side: server address; server side: client address */
};

struct http_agg {
	__u64 count;
	__u64 duration_ns; /* sum */
	__u64 req_body_count; /* exchanges whose request head (so body size) was seen whole */
	__u64 req_body_bytes; /* sum */
	__u64 resp_body_bytes; /* sum (server side; one observation per exchange) */
	__u64 duration[HTTP_DURATION_BOUNDS + 1];
	__u64 req_body[HTTP_SIZE_BOUNDS + 1];
	__u64 resp_body[HTTP_SIZE_BOUNDS + 1];
};

/* A client connection's local end, so the server side of a connection on this host can name
 * the process at the other end without the ephemeral port in any key. */
struct http_endpoint {
	__u8 addr[16];
	__u16 port;
	__u8 family;
	__u8 _pad;
};

#define HTTP_STATE_IDLE 0
#define HTTP_STATE_REQUEST 1 /* request seen, no response yet */
#define HTTP_STATE_RESPONSE 2 /* server: response being written */
#define HTTP_STATE_DONE 3 /* server: response written to its last byte, counted */

#define HTTP_PROTO_UNKNOWN 0
#define HTTP_PROTO_YES 1
#define HTTP_PROTO_NO 2
#define HTTP_PROTO_H2 4 /* HTTP/2: frames are parsed in user space from raw chunks */

#define H2_CHUNK 4096 /* bytes of data per chunk record */
#define H2_MAX_CHUNKS 64 /* chunk records per syscall: walks iovecs (gRPC writes many slices) */
#define H2_RECORD_CHUNK 2
#define H2_FLAG_TLS (1 << 0)
#define H2_FLAG_TRUNCATED (1 << 1) /* the syscall moved more than was shipped */

/* Raw bytes of an HTTP/2 connection, in order per connection (seq counts every chunk, so a
 * dropped one is noticed and the connection is given up rather than misparsed). */
struct h2_chunk {
	__u32 kind;
	__u32 tgid;
	__u32 tid;
	__u32 len;
	__u64 conn_id;
	__u64 ts_ns;
	__u32 seq;
	__u8 dir; /* 1 in, 2 out, from this process's point of view */
	__u8 role;
	__u8 flags;
	__u8 family;
	__u16 lport;
	__u16 rport;
	__u32 _pad;
	__u8 laddr[16];
	__u8 raddr[16];
	__u8 data[H2_CHUNK];
};

struct http_conn {
	struct http_exchange ex;
	__u8 state;
	__u8 proto;
	__u8 last_dir;
	__u8 partial_len; /* bytes of a split method kept in `partial` */
	__u16 outstanding; /* client: pipelined requests awaiting a response */
	__u16 _pad;
	__u32 h2_seq;
	__u32 _pad2;
	__u64 resp_end_at; /* server: response bytes at which it is complete (0: not known) */
	__u8 partial[8];
};
