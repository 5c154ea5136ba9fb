"""The one exchange model every protocol's exchanges reach the aggregation in.

A batch of exchanges is a numpy array of `EXCHANGE` rows: the neutral record header (who saw
it, on which connection: bpf/l7/l7.h L7_HEADER), when it started and ended, body sizes, and
its labels as interned ids (`LabelTables`): an operation (HTTP method, SQL verb, Redis
command, DNS type), a target (HTTP route, table, DNS question) and a status (HTTP status code,
SQLSTATE, Redis error prefix, DNS rcode). HTTP/1.x rows are made from kernel records a whole
column at a time (l7/protocols/http1.py); rows of protocols parsed in user space are made from
their parsers' `Exchange` objects (`rows_from_exchanges`). Metrics, the service graph, spans,
the UI and the budgets all read these rows; an `ExchangeBatch` adds each row's strings for the
consumers that want them (spans, the events feed).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probewire.l7.constants import HttpMethod, L7Flag, Proto, Role
from probewire.l7.protocol import Exchange
from probewire.l7.records import HEADER_FIELDS, HEADER_SIZE

EXCHANGE = np.dtype(
    [
        *HEADER_FIELDS,
        ("start_ns", np.uint64),
        ("end_ns", np.uint64),
        ("req_body", np.int64),  # body bytes of the request, -1 when not known
        ("resp_body", np.int64),  # body bytes of the response, -1 when none is counted
        ("op", np.uint32),  # LabelTables.ops id
        ("target", np.uint32),  # LabelTables.targets id
        ("status", np.uint32),  # LabelTables status id (HTTP: the status code itself)
        ("eflags", np.uint32),  # ExchangeFlag
    ]
)


class ExchangeFlag(enum.IntFlag):
    ABORTED = 1  # the connection ended before the response came
    ERROR = 2  # the protocol said it failed (not HTTP: its status code says)
    GRPC = 4  # an HTTP/2 stream that is a gRPC call (rpc_* metrics, not http_*)
    H2 = 8  # made from an HTTP/2 stream
    PIPELINED = 16  # HTTP/1.x: not the first request of its head


# Every HTTP method the kernel knows has its code as its op id; other ops follow them.
METHODS: tuple[str, ...] = tuple("_OTHER" if m is HttpMethod.OTHER else m.name
                                 for m in HttpMethod)
# Status ids below this are HTTP status codes (their own text); interned statuses follow.
NUMERIC_STATUSES = 1000
# Ids are packed in aggregation keys: past these, new strings share an overflow id.
MAX_OPS = 1 << 9
MAX_STATUSES = 1 << 12
OVERFLOW = "_OTHER"


class LabelTables:
    """Interned label strings, shared by every protocol's decoder and the aggregation. Ids are
    dense and stable until `reset` (the memo behind them grew too big), which bumps
    `generation` so decoders drop ids they cached."""

    def __init__(self) -> None:
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        self.generation += 1
        self.ops: list[str] = list(METHODS)
        self.op_ids: dict[str, int] = {m: i for i, m in enumerate(METHODS)}
        self.targets: list[str] = []
        self.target_ids: dict[str, int] = {}
        self.statuses: list[str] = []
        self.status_ids: dict[str, int] = {}

    def op(self, name: str) -> int:
        found = self.op_ids.get(name)
        if found is None:
            if len(self.ops) >= MAX_OPS - 1:
                return self.op_ids[OVERFLOW]
            found = self.op_ids[name] = len(self.ops)
            self.ops.append(name)
        return found

    def target(self, name: str) -> int:
        found = self.target_ids.get(name)
        if found is None:
            found = self.target_ids[name] = len(self.targets)
            self.targets.append(name)
        return found

    def status(self, name: str) -> int:
        """Id of a status string ("" -> 0, an HTTP code's digits -> the code)."""
        if not name:
            return 0
        if name.isdigit() and len(name) <= 3:
            return int(name)
        found = self.status_ids.get(name)
        if found is None:
            if len(self.statuses) >= MAX_STATUSES - NUMERIC_STATUSES - 1:
                return self.status(OVERFLOW) if name != OVERFLOW else NUMERIC_STATUSES
            found = self.status_ids[name] = NUMERIC_STATUSES + len(self.statuses)
            self.statuses.append(name)
        return found

    def status_name(self, sid: int) -> str:
        if sid < NUMERIC_STATUSES:
            return str(sid) if sid else ""
        return self.statuses[sid - NUMERIC_STATUSES]

    def size(self) -> int:
        return len(self.ops) + len(self.targets) + len(self.statuses)


# DB targets carry their namespace: "namespace\0collection" (the labeler splits them).
def db_target(collection: str, namespace: str) -> str:
    return f"{namespace}\0{collection}" if namespace else collection


def split_db_target(target: str) -> tuple[str, str]:
    """(collection, namespace) of a db_target string."""
    namespace, sep, collection = target.partition("\0")
    return (collection, namespace) if sep else (target, "")


@dataclass(frozen=True)
class ExchangeBatch:
    """A batch of exchange rows with each row's strings, for consumers beyond metrics (spans,
    the events feed). Timestamps are CLOCK_MONOTONIC nanoseconds. `http` holds the kernel's
    HTTP records of HTTP/1.x rows (row i's is http[http_index[i]]; -1 for other rows), whose
    heads spans read (url, traceparent); `attributes` holds per-row protocol attributes."""

    rows: np.ndarray
    service: list[str]
    operation: list[str]
    target: list[str]
    status: list[str]
    peer_address: list[str]
    local_address: list[str]
    http: np.ndarray | None = None
    http_index: np.ndarray | None = None
    attributes: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def header_of(record: np.ndarray) -> bytes:
    """The neutral header bytes of one kernel record (any L7 record starts with it)."""
    return record.tobytes()[:HEADER_SIZE]


def rows_from_exchanges(items: Sequence[tuple[bytes, Exchange]], proto: int,
                        labels: LabelTables, target_of: Any = None) -> np.ndarray:
    """Exchange rows from parser exchanges, each with the header bytes of its connection.

    `target_of(exchange) -> str` gives a row's target string (default: the exchange's
    target, with its namespace for database protocols)."""
    n = len(items)
    rows = np.zeros(n, dtype=EXCHANGE)
    if not n:
        return rows
    raw = rows.view(np.uint8).reshape(n, -1)
    raw[:, :HEADER_SIZE] = np.frombuffer(b"".join(h for h, _ in items),
                                         dtype=np.uint8).reshape(n, HEADER_SIZE)
    exchanges = [ex for _, ex in items]
    rows["proto"] = proto
    tids = [ex.tid for ex in exchanges]
    if any(tids):
        rows["tid"] = np.where(np.array(tids) != 0, tids, rows["tid"])
    rows["start_ns"] = [ex.start_ns for ex in exchanges]
    rows["end_ns"] = [max(ex.end_ns, ex.start_ns) for ex in exchanges]
    rows["req_body"] = -1
    rows["resp_body"] = -1
    op, target, status = labels.op, labels.target, labels.status
    rows["op"] = [op(ex.operation or OVERFLOW) for ex in exchanges]
    rows["target"] = [target(target_of(ex) if target_of is not None
                             else db_target(ex.target, ex.namespace)) for ex in exchanges]
    rows["status"] = [status(f"{ex.status}\0{ex.error_type}"
                             if ex.error_type and ex.error_type != ex.status else ex.status)
                      for ex in exchanges]
    rows["eflags"] = [(ExchangeFlag.ABORTED if ex.aborted else 0)
                      | (ExchangeFlag.ERROR if ex.error_type else 0) for ex in exchanges]
    for i, ex in enumerate(exchanges):
        if ex.peer is not None and ex.peer[0]:
            _set_peer(rows[i], ex.peer)
    return rows


def _set_peer(row: np.void, peer: tuple[str, int]) -> None:
    import ipaddress

    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return
    raw = np.zeros(16, dtype=np.uint8)
    packed = address.packed
    raw[: len(packed)] = np.frombuffer(packed, dtype=np.uint8)
    row["raddr"] = raw
    row["family"] = 2 if address.version == 4 else 10
    row["rport"] = peer[1]


__all__ = ["EXCHANGE", "METHODS", "ExchangeBatch", "ExchangeFlag", "L7Flag", "LabelTables",
           "Proto", "Role", "db_target", "rows_from_exchanges", "split_db_target"]
