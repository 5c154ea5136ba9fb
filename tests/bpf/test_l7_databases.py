"""Databases, caches and DNS through the agent: Debian's PostgreSQL, MariaDB, Redis, memcached
and dnsmasq, driven by their stock clients (psql, mariadb, redis-cli, dig, getent) and by the
Python drivers (psycopg, PyMySQL, redis-py, pymemcache, getaddrinfo), with random mixes,
sizes and errors. Every operation the clients made is counted exactly, as the client
(db_client_operation_duration_seconds, per operation, collection and status) and as the
server (db_server_operation_duration_seconds), and the service graph has the database edge.

The ground truth is what the drivers did (tests/support/dbservers.py); tests/e2e/
test_l7_servers.py checks the parsers on the same traffic through a recording relay.

Needs: root, tp/ syscall tracepoints, ring buffers, tail calls; the servers from setup.sh.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from agentlib import Samples, running_agent, scrape, wait_for

from support import dbservers as db

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(300)]

Driver = Callable[[int, random.Random, int], db.Truth]
CASES: dict[str, tuple[Callable[[], object], list[Driver], str]] = {
    "postgresql": (db.postgres_server, [db.pg_driver, db.pg_cli], "postgres"),
    "mysql": (db.mariadb_server, [db.mysql_driver, db.mysql_cli], "mariadbd"),
    "redis": (db.redis_server, [db.redis_driver, db.redis_cli], "redis-server"),
    "memcached": (db.memcached_server, [db.memcached_driver], "memcached"),
}
# What a driver sends on its own, per run (one connection each): not in its ground truth.
DRIVER_OWN = {
    "mysql_driver": Counter({("mysql", "SET", "", ""): 1}),  # PyMySQL: SET AUTOCOMMIT = 1
}
CLIENT = "db_client_operation_duration_seconds_count"
SERVER = "db_server_operation_duration_seconds_count"


def operations(samples: Samples, family: str, system: str, **match: str) -> db.Truth:
    """(system, operation, collection, status) counts of one system's series."""
    out: db.Truth = Counter()
    for (name, labels), value in samples.items():
        d = dict(labels)
        if name != family or d.get("db_system_name") != system:
            continue
        if any(d.get(k) != v for k, v in match.items()):
            continue
        key = (system, d["db_operation_name"], d["db_collection_name"],
               d["db_response_status_code"])
        out[key] += int(value)
    return +out


def exact_on_both_sides(listen: str, system: str, port: int, truth: db.Truth) -> Samples:
    """Once both sides have counted what the clients did, each side's counts equal `truth`
    (the client side of the server at `port`; the server side of every `system` server the
    agent traces). Returns the last scrape."""
    want = sum(truth.values())

    def both() -> bool:
        s = scrape(listen)
        return (sum(operations(s, CLIENT, system, server_port=str(port)).values()) >= want
                and sum(operations(s, SERVER, system).values()) >= want)

    wait_for(both, timeout_s=30)
    s = scrape(listen)
    client = operations(s, CLIENT, system, server_port=str(port))
    served = operations(s, SERVER, system)
    assert client == truth, (client - truth, truth - client)
    assert served == truth, (served - truth, truth - served)
    return s


@pytest.fixture(scope="module", params=sorted(CASES))
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, db.DbServer]]:
    start, _, _ = CASES[request.param]
    with start() as srv:  # type: ignore[attr-defined]
        yield request.param, srv


@pytest.mark.parametrize("seed", [11, 12])
def test_every_operation_of_real_clients_is_counted_exactly_on_both_sides(
        server: tuple[str, db.DbServer], seed: int) -> None:
    name, srv = server
    _, drivers, server_process = CASES[name]
    rnd = random.Random(seed)
    # Only this server's connections are traced: the server side has no port label, and a
    # foreign server of the same system on this host would otherwise count too.
    with running_agent({"filter": {"ports": [srv.port]}}) as (_, listen):
        truth: db.Truth = Counter()
        for driver in drivers:
            truth += driver(srv.port, rnd, rnd.randint(20, 60))
            truth += DRIVER_OWN.get(driver.__name__, Counter())
        s = exact_on_both_sides(listen, name, srv.port, truth)
        services = {dict(labels)["service_name"] for (family, labels), _ in s.items()
                    if family == SERVER and dict(labels)["db_system_name"] == name}
        assert services == {server_process}
        edges = {(dict(labels)["server"], dict(labels)["connection_type"])
                 for (family, labels), _ in s.items()
                 if family == "traces_service_graph_request_total"}
        assert (server_process, "database") in edges, edges


def test_postgresql_over_tls_through_libssl_is_counted_exactly_on_both_sides() -> None:
    """psql and psycopg (both over libpq, which negotiates TLS with libssl.so.3) against a
    server with ssl=on: the plaintext comes from the TLS uprobes, on both sides."""
    rnd = random.Random(21)
    with db.postgres_server(tls=True) as srv, \
            running_agent({"filter": {"ports": [srv.port]}}) as (agent, listen):
        truth = db.pg_driver(srv.port, rnd, 30, sslmode="require")
        truth += db.pg_cli(srv.port, rnd, 30, sslmode="require")
        exact_on_both_sides(listen, "postgresql", srv.port, truth)
        # The series say TLS was seen: the exchanges came through the uprobes.
        tls = agent.probes["l7"].tls_status()  # type: ignore[attr-defined]
        assert any("libssl" in lib for lib in tls["libraries"]), tls


def test_dns_lookups_of_dig_getent_and_getaddrinfo_are_counted_exactly() -> None:
    rnd = random.Random(5)
    with db.resolver_netns("127.0.0.1") as ns, \
            db.dns_server(netns=ns, listen="127.0.0.1", port=53), \
            running_agent() as (_, listen):
        truth = db.dns_driver(ns, "127.0.0.1", 53, rnd, 30)
        # A server that never answers: dig gives up, the agent says "timeout" (5 s on).
        truth += db.dns_unanswered(ns, "silent.probewire.test")
        want = sum(truth.values())
        family = "dns_lookup_duration_seconds_count"

        def lookups() -> db.Truth:
            out: db.Truth = Counter()
            for (name, labels), value in scrape(listen).items():
                d = dict(labels)
                if name == family and d["dns_question_name"].endswith("probewire.test"):
                    status = d["error_type"].upper()
                    out["dns", d["dns_question_type"], d["dns_question_name"], status] += \
                        int(value)
            return +out

        wait_for(lambda: sum(lookups().values()) >= want, timeout_s=40)
        got = lookups()
        assert got == truth, (sorted((got - truth).items()), sorted((truth - got).items()))
