"""The protocol registry: every protocol plug-in, in one list.

Adding a protocol is its module under l7/protocols/ (a `PROTOCOL`) and one line here, as it is
its proto_<name>.h and one line of L7_PROTOCOLS in bpf/l7.bpf.c on the kernel side
(tests/unit/test_l7_registry.py checks that the two lists agree).
"""

from __future__ import annotations

from probewire.l7.constants import Proto
from probewire.l7.protocol import ConnInfo, Direction, Protocol, Role, StreamParser, Transport
from probewire.l7.protocols import dns, http1, http2, memcached, mysql, postgresql, redis

# In enum l7_proto order (the kernel tries classifiers in its L7_PROTOCOLS order).
PROTOCOLS: tuple[Protocol, ...] = (
    http1.PROTOCOL,
    http2.PROTOCOL,
    postgresql.PROTOCOL,
    mysql.PROTOCOL,
    redis.PROTOCOL,
    memcached.PROTOCOL,
    dns.PROTOCOL,
)


class _Unknown(Protocol):
    """What a row of an id no plug-in claims is labelled as (it feeds no RED series)."""

    name = "unknown"
    proto_id = Proto.UNKNOWN
    kind = "unknown"

    def classify(self, peek: bytes, direction: Direction, transport: Transport, *,
                 lport: int = 0, rport: int = 0, call_len: int = 0) -> Role:
        return Role.UNKNOWN

    def parser(self, conn: ConnInfo) -> StreamParser:
        raise LookupError("no protocol plug-in for this id")


_BY_ID: dict[int, Protocol] = {p.proto_id: p for p in PROTOCOLS}
_BY_NAME: dict[str, Protocol] = {p.name: p for p in PROTOCOLS}
UNKNOWN = _Unknown()


def protocol_by_id(proto_id: int) -> Protocol:
    return _BY_ID.get(proto_id, UNKNOWN)


def protocol_by_name(name: str) -> Protocol | None:
    return _BY_NAME.get(name)
