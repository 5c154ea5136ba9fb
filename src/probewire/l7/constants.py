"""Kernel/user constants of the l7 family, generated from the BTF of l7.bpf.o by
scripts/gen_constants.py: do not edit. Their one source is the C enums in bpf/l7/*.h;
run `make constants` after changing one (tests/unit/test_btf_layouts.py checks)."""

import enum

L7_PEEK = 32
L7_MAX_TRIES = 8
L7_CHUNK = 8192
L7_MAX_CHUNKS = 32
HTTP_HEAD_LEN = 256
HTTP_PATH_MAX = 128


class Proto(enum.IntEnum):
    """enum l7_proto"""

    UNKNOWN = 0
    HTTP = 1
    HTTP2 = 2
    POSTGRESQL = 3
    MYSQL = 4
    REDIS = 5
    MEMCACHED = 6
    DNS = 7
    COUNT = 8
    NONE = 254
    FILTERED = 255


class Role(enum.IntEnum):
    """enum l7_role"""

    UNKNOWN = 0
    SERVER = 1
    CLIENT = 2


class Direction(enum.IntEnum):
    """enum l7_dir"""

    IN = 1
    OUT = 2


class Transport(enum.IntEnum):
    """enum l7_transport"""

    TCP = 6
    UDP = 17


class RecordKind(enum.IntEnum):
    """enum l7_record"""

    HTTP = 1
    DATA = 2
    CLOSE = 3


class L7Flag(enum.IntFlag):
    """enum l7_flag"""

    TLS = 1
    UDP = 2
    PREEXISTING = 4


class Coverage(enum.IntEnum):
    """enum l7_coverage"""

    CLASSIFIED = 0
    UNCLASSIFIED_TLS = 1
    UNCLASSIFIED = 2
    TRUNCATED = 3
    NO_SYS_ENTER = 4
    COUNT = 5


class HttpMethod(enum.IntEnum):
    """enum http_method"""

    OTHER = 0
    GET = 1
    POST = 2
    PUT = 3
    DELETE = 4
    HEAD = 5
    PATCH = 6
    OPTIONS = 7
    CONNECT = 8
    TRACE = 9


class HttpFlag(enum.IntFlag):
    """enum http_flag"""

    ABORTED = 1
    PIPELINED = 2
    SAMPLED = 4
    H2 = 64
    GRPC = 128
