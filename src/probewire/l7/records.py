"""numpy dtypes of the l7 family's kernel structs (bpf/l7/l7.h, http.h).

Each is checked against the object's BTF at load (probes/base.start_probe) and by
tests/unit/test_btf_layouts.py: the two sides cannot drift. Every ring record starts with the
neutral header (`HEADER_FIELDS`), so the stages after decoding (connections, services,
series, the graph) read any protocol's rows the same way.
"""

from __future__ import annotations

import numpy as np

from probewire.l7.constants import HTTP_HEAD_LEN

# The L7_HEADER macro of bpf/l7/l7.h, field by field.
HEADER_FIELDS: list[tuple[str, type] | tuple[str, type, tuple[int, ...]]] = [
    ("kind", np.uint16),
    ("proto", np.uint8),
    ("role", np.uint8),
    ("tgid", np.uint32),
    ("tid", np.uint32),
    ("peer_tgid", np.uint32),
    ("conn_id", np.uint64),
    ("family", np.uint8),
    ("flags", np.uint8),
    ("lport", np.uint16),
    ("rport", np.uint16),
    ("_hpad", np.uint16),
    ("laddr", np.uint8, (16,)),
    ("raddr", np.uint8, (16,)),
]
L7_HEADER = np.dtype(HEADER_FIELDS)
HEADER_SIZE = L7_HEADER.itemsize

HTTP_EXCHANGE = np.dtype(
    [
        *HEADER_FIELDS,
        ("method", np.uint8),
        ("hflags", np.uint8),
        ("status", np.uint16),
        ("pipe_idx", np.uint16),
        ("req_head_len", np.uint16),
        ("resp_head_len", np.uint16),
        ("_pad", np.uint16),
        ("resp_first_write", np.uint32),
        ("resp_header_end", np.int32),
        ("_pad2", np.uint32),
        ("start_ns", np.uint64),
        ("end_ns", np.uint64),
        ("req_bytes", np.uint64),
        ("resp_bytes", np.uint64),
        ("path_hash", np.uint64),
        ("req_head", np.uint8, (HTTP_HEAD_LEN,)),
        ("resp_head", np.uint8, (HTTP_HEAD_LEN,)),
    ]
)

# The fixed part of struct l7_data; `len` bytes of data follow each record in the ring.
L7_DATA = np.dtype(
    [
        *HEADER_FIELDS,
        ("ts_ns", np.uint64),
        ("seq", np.uint32),
        ("len", np.uint32),
        ("skipped", np.uint32),
        ("dir", np.uint8),
        ("_pad", np.uint8, (3,)),
    ]
)

# OpenTelemetry's recommended boundaries for *.duration histograms (seconds); the kernel counts
# in exactly these (const volatile duration_bounds_ns, set from here before load).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0)
SIZE_BUCKETS = (0, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)

L7_AGG_KEY = np.dtype(
    [
        ("tgid", np.uint32),
        ("op", np.uint32),
        ("peer_tgid", np.uint32),
        ("lport", np.uint16),
        ("rport", np.uint16),
        ("status", np.uint16),
        ("proto", np.uint8),
        ("role", np.uint8),
        ("method", np.uint8),
        ("flags", np.uint8),
        ("pflags", np.uint8),
        ("family", np.uint8),
        ("laddr", np.uint8, (16,)),
        ("raddr", np.uint8, (16,)),
    ]
)
L7_AGG = np.dtype(
    [
        ("count", np.uint64),
        ("duration_ns", np.uint64),
        ("req_body_count", np.uint64),
        ("req_body_bytes", np.uint64),
        ("resp_body_bytes", np.uint64),
        ("duration", np.uint64, (len(DURATION_BUCKETS) + 1,)),
        ("req_body", np.uint64, (len(SIZE_BUCKETS) + 1,)),
        ("resp_body", np.uint64, (len(SIZE_BUCKETS) + 1,)),
    ]
)
L7_OP_KEY = np.dtype([("hash", np.uint64), ("proto", np.uint32), ("_pad", np.uint32)])
L7_ENDPOINT = np.dtype(
    [("addr", np.uint8, (16,)), ("port", np.uint16), ("family", np.uint8), ("_pad", np.uint8)]
)

# C struct name -> dtype: what start_probe and the layout test check.
STRUCTS: dict[str, np.dtype] = {
    "l7_header": L7_HEADER,
    "http_exchange": HTTP_EXCHANGE,
    "l7_data": L7_DATA,
    "l7_agg_key": L7_AGG_KEY,
    "l7_agg": L7_AGG,
    "l7_op_key": L7_OP_KEY,
    "l7_endpoint": L7_ENDPOINT,
}
