"""The contract between the capture layer and a protocol plug-in.

A protocol plug-in is one module under ``probewire.l7.protocols`` that defines ``PROTOCOL``, an
instance of a :class:`Protocol` subclass. The capture layer hands each connection's bytes to a
:class:`StreamParser` the protocol makes for that connection, one :class:`Segment` at a time, in
order, per direction; the parser returns the :class:`Exchange` objects those bytes finish.

Segments may carry holes: ``skipped`` bytes that the call moved after ``data`` but that were
not captured (a call larger than the capture, or a payload the kernel walked over without
copying). A parser that knows it is inside a message of known length simply moves past them;
one that cannot tell where the next message starts has lost sync, says why in ``failures`` and
picks the stream up again where it can prove a message starts (never by guessing).

Parsers never raise on bad input: garbage, truncation or a protocol violation is counted in
``failures`` (reason -> count) and the parser carries on or gives the connection up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from probewire.l7.constants import Direction, Role, Transport

__all__ = ["ConnInfo", "Direction", "Exchange", "Protocol", "Role", "Segment", "StreamParser",
           "Transport"]


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """The connection a parser is made for, as the capture layer identified it."""

    transport: Transport
    role: Role
    tls: bool = False
    tgid: int = 0
    family: int = 2  # AF_INET / AF_INET6
    local: tuple[str, int] = ("", 0)
    remote: tuple[str, int] = ("", 0)


@dataclass(slots=True)
class Segment:
    """The bytes one call moved (or one datagram), as captured."""

    direction: Direction
    data: bytes
    ts_ns: int  # CLOCK_MONOTONIC, when the call returned
    tid: int = 0
    skipped: int = 0  # bytes the call moved after `data` that were not captured
    # UDP: the datagram's remote end, when the socket is not connected (None: the connection's).
    peer: tuple[str, int] | None = None


@dataclass(slots=True)
class Exchange:
    """One request and its response, from the point of view of the process that saw it.

    The label-bearing fields are bounded by construction: ``operation`` is a verb, command or
    record type (never free text), ``target`` a table, route or question name (budgeted by the
    aggregation), ``status`` a protocol code. Literals of a query never appear in any field.
    """

    start_ns: int  # client: request written; server: request read
    end_ns: int  # client: response read; server: response written
    operation: str  # SQL verb ("SELECT"), Redis/memcached command ("GET"), DNS type ("AAAA")
    target: str = ""  # table / collection, DNS question name; "" when there is none
    status: str = ""  # on errors: SQLSTATE, MySQL error number, Redis error prefix, DNS rcode
    error_type: str = ""  # "" when the exchange succeeded, else a short class ("nxdomain", ...)
    namespace: str = ""  # database name when the protocol says it
    request_bytes: int = 0
    response_bytes: int = 0
    tid: int = 0  # thread that issued (client) or read (server) the request
    summary: str = ""  # span-only: a literal-free summary, e.g. "SELECT users"
    peer: tuple[str, int] | None = None  # UDP: the remote end of this exchange
    aborted: bool = False  # the connection ended before the response came
    # Protocol-specific facts for spans and protocol metrics (never labels by themselves),
    # e.g. HTTP/2's {"path": ..., "grpc_status": ...}.
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamParser(ABC):
    """Per-connection parser state. One instance per connection (both directions)."""

    conn: ConnInfo
    failures: Counter[str] = field(default_factory=Counter)
    # Set (to the reason) when the parser gave the connection up for good: it is fed no more.
    lost: str = ""

    @abstractmethod
    def feed(self, segment: Segment) -> list[Exchange]:
        """Consume one segment; return the exchanges it finished (possibly none)."""

    def expire(self, now_ns: int) -> list[Exchange]:
        """Exchanges that waited too long for an answer (e.g. DNS timeouts); called from time
        to time with the current CLOCK_MONOTONIC time."""
        return []

    def close(self, ts_ns: int) -> list[Exchange]:
        """The connection ended: requests still waiting for a response are aborted."""
        return []


class Protocol(ABC):
    """A protocol plug-in. ``name`` is its db.system.name / label value ("postgresql")."""

    name: str
    proto_id: int  # the kernel's id (enum l7_proto in bpf/l7/l7.h)
    transports: frozenset[Transport] = frozenset({Transport.TCP})
    # What its exchanges feed: "db" (db_client_operation_duration_seconds), "dns", "http".
    kind: str
    # Parsed by its kernel parser (exchanges arrive as records), not by `parser()`.
    parsed_in_kernel: bool = False

    @abstractmethod
    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        """The Python mirror of the kernel classifier: given the first bytes a call moved on a
        connection not yet classified, the role of the process if they start a message of this
        protocol, else Role.UNKNOWN. Must agree with the kernel's on every input.

        ``peek`` is at most L7_PEEK bytes (struct l7_peek's data[:len]); ``lport``/``rport`` are
        the socket's local and remote ports and ``call_len`` the bytes the whole call moved
        (0: just ``len(peek)``), as struct l7_peek carries them."""

    @abstractmethod
    def parser(self, conn: ConnInfo) -> StreamParser:
        """A parser for one connection."""
