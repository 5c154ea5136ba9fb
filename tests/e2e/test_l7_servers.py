"""The protocol parsers on real traffic: Debian's servers driven by their stock clients and by
the Python drivers, through a relay that records every read with its true boundaries
(tests/support/relay.py). The exchanges parsed from the relay's reads, seen as the server and
as the client, count exactly what the drivers did, per (system, operation, collection,
status), errors included. The first message of each connection is classified as its protocol
by the Python classifier (the kernel one is checked against it in tests/bpf/test_l7_classify).

Needs root (PostgreSQL and MariaDB run as their own users, DNS in a network namespace).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from probewire.l7.protocol import ConnInfo, Protocol, Role, Segment, Transport
from probewire.l7.protocols import dns, memcached, mysql, postgresql, redis
from support import dbservers as db
from support.relay import TcpRelay, UdpRelay

pytestmark = pytest.mark.e2e

Driver = Callable[[int, random.Random, int], db.Truth]
CASES = {
    "postgresql": (postgresql.PROTOCOL, db.postgres_server, [db.pg_driver, db.pg_cli]),
    "mysql": (mysql.PROTOCOL, db.mariadb_server, [db.mysql_driver, db.mysql_cli]),
    "redis": (redis.PROTOCOL, db.redis_server, [db.redis_driver, db.redis_cli]),
    "memcached": (memcached.PROTOCOL, db.memcached_server, [db.memcached_driver]),
}
# What the drivers send on their own, per connection (not in their ground truth).
DRIVER_OWN = {
    "mysql_driver": Counter({("mysql", "SET", "", ""): 1}),  # PyMySQL: SET AUTOCOMMIT = 1
}


def parse(proto: Protocol, segments: list[Segment], role: Role) -> db.Truth:
    parser = proto.parser(ConnInfo(Transport.TCP, role))
    got: db.Truth = Counter()
    exchanges = []
    for seg in segments:
        exchanges += parser.feed(seg)
    exchanges += parser.close(segments[-1].ts_ns + 1 if segments else 0)
    for e in exchanges:
        assert not e.aborted
        got[proto.name, e.operation, e.target, e.status] += 1
    assert not [k for k in parser.failures if k != "tls_ciphertext"], parser.failures
    return got


@pytest.fixture(scope="module", params=sorted(CASES))
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, db.DbServer]]:
    _, start, _ = CASES[request.param]
    with start() as srv:
        yield request.param, srv


@pytest.mark.parametrize("seed", [1, 2])
def test_exchanges_from_real_traffic_match_the_drivers_exactly(
        server: tuple[str, db.DbServer], seed: int) -> None:
    name, srv = server
    proto, _, drivers = CASES[name]
    rnd = random.Random(seed)
    for driver in drivers:
        with TcpRelay(srv.port) as relay:
            truth = driver(relay.port, rnd, 40)
        for _ in relay.connections:
            truth += DRIVER_OWN.get(driver.__name__, Counter())
        for role in (Role.SERVER, Role.CLIENT):
            got: db.Truth = Counter()
            for conn in relay.connections:
                segs = conn.server_view if role == Role.SERVER else conn.client_view
                got += parse(proto, segs, role)
                # the connection's first read or write classifies it as this protocol
                first = segs[0]
                assert proto.classify(first.data[:32], first.direction, Transport.TCP,
                                      call_len=len(first.data)) == role, first.data[:40]
            assert got == truth, (driver.__name__, role, got - truth, truth - got)


def test_dns_lookups_by_dig_getent_and_getaddrinfo_match_exactly() -> None:
    rnd = random.Random(3)
    with db.resolver_netns("127.0.0.1") as ns, \
            db.dns_server(netns=ns, listen="127.0.0.2", port=53), \
            UdpRelay(ns, ("127.0.0.1", 53), ("127.0.0.2", 53)) as relay:
        truth = db.dns_driver(ns, "127.0.0.1", 53, rnd, 24)
    parser = dns.PROTOCOL.parser(ConnInfo(Transport.UDP, Role.SERVER, local=("127.0.0.1", 53)))
    got: db.Truth = Counter()
    for seg in relay.segments:
        for e in parser.feed(seg):
            got["dns", e.operation, e.target, e.status] += 1
    assert not parser.close(10**19)
    first = relay.segments[0]
    assert dns.PROTOCOL.classify(first.data, first.direction, Transport.UDP, lport=53,
                                 rport=first.peer[1] if first.peer else 0) == Role.SERVER
    assert got == truth, (got - truth, truth - got)
