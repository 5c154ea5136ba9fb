/* HTTP/1.x on the capture layer: its record and constants, shared by proto_http.h,
 * http_parse.h and (through BTF) src/probewire/l7/protocols/http1.py. */
#pragma once

#include "l7.h"

#define HTTP_HEAD_LEN 256 /* bytes of each message head kept (request line, headers) */
#define HTTP_APPEND_CHUNK 64 /* later reads append at most this much to a head */
#define HTTP_PATH_MAX 128 /* path bytes hashed; user space templates the same bytes */

enum http_limit {
	HTTP_LIMIT_HEAD_LEN = HTTP_HEAD_LEN,
	HTTP_LIMIT_PATH_MAX = HTTP_PATH_MAX,
};

/* Methods the kernel recognises at the start of a buffer (0: user space reads the head). */
enum http_method {
	HTTP_OTHER = 0,
	HTTP_GET = 1,
	HTTP_POST = 2,
	HTTP_PUT = 3,
	HTTP_DELETE = 4,
	HTTP_HEAD = 5,
	HTTP_PATCH = 6,
	HTTP_OPTIONS = 7,
	HTTP_CONNECT = 8,
	HTTP_TRACE = 9,
};

/* http_exchange.hflags. */
enum http_flag {
	HTTP_FLAG_ABORTED = 1, /* connection closed before the response started */
	HTTP_FLAG_PIPELINED = 2, /* not the first request of its read: user space parses the head */
	HTTP_FLAG_SAMPLED = 4, /* spans on: the kernel kept this exchange's trace (1 in N) */
	/* Set by user space only, on rows it makes from HTTP/2 streams. */
	HTTP_FLAG_H2 = 64,
	HTTP_FLAG_GRPC = 128,
};

/* One request/response exchange. Server side: emitted when the response is complete (the
 * server reads again, answers the next pipelined request, or closes). Client side: emitted
 * when the response starts (status known), so idle pooled connections never hold it back. */
struct http_exchange {
	L7_HEADER;
	__u8 method; /* enum http_method */
	__u8 hflags; /* enum http_flag */
	__u16 status; /* 0 when aborted */
	__u16 pipe_idx; /* n-th request found in the same request head */
	__u16 req_head_len;
	__u16 resp_head_len;
	__u16 _pad;
	__u32 resp_first_write; /* length of the response's first write (its header block) */
	__s32 resp_header_end; /* server side: the response head's CRLFCRLF end, -1 if not in it */
	__u32 _pad2;
	__u64 start_ns; /* server: request's first byte read; client: request write began */
	__u64 end_ns; /* server: last response byte written; client: response's first read */
	__u64 req_bytes; /* request bytes on the wire (head and body) */
	__u64 resp_bytes; /* response bytes (server: all of them; client: the first read) */
	__u64 path_hash; /* of the method and request path: the kernel aggregation's op hash */
	__u8 req_head[HTTP_HEAD_LEN];
	__u8 resp_head[HTTP_HEAD_LEN];
};

#define HTTP_STATE_IDLE 0
#define HTTP_STATE_REQUEST 1 /* request seen, no response yet */
#define HTTP_STATE_RESPONSE 2 /* server: response being written */
#define HTTP_STATE_DONE 3 /* server: response written to its last byte, counted */

/* Per connection: the exchange being built, and where the state machine is. */
struct http_state {
	struct http_exchange ex;
	__u8 state;
	__u8 partial_len; /* bytes of a split method kept in `partial` */
	__u16 outstanding; /* client: pipelined requests awaiting a response */
	__u32 _pad;
	__u64 resp_end_at; /* server: response bytes at which it is complete (0: not known) */
	__u8 partial[8];
};
