"""Kernel/user constants of the L7 capture layer (bpf/l7/l7.h).

To be generated from the object's BTF by the build (the lead replaces this hand copy with the
generator and a drift test); names and values mirror the C enums exactly.
"""

L7_PROTO_UNKNOWN = 0
L7_PROTO_HTTP = 1
L7_PROTO_HTTP2 = 2
L7_PROTO_POSTGRESQL = 3
L7_PROTO_MYSQL = 4
L7_PROTO_REDIS = 5
L7_PROTO_MEMCACHED = 6
L7_PROTO_DNS = 7
L7_PROTO_COUNT = 8

L7_ROLE_UNKNOWN = 0
L7_ROLE_SERVER = 1
L7_ROLE_CLIENT = 2

L7_DIR_IN = 1
L7_DIR_OUT = 2

L7_TCP = 6
L7_UDP = 17

L7_PEEK = 32
