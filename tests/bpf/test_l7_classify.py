"""The protocols' kernel classifiers (bpf/l7/proto_<name>.h) against their Python mirrors.

A SEC("syscall") harness (l7_classify_harness.bpf.c) runs every classifier on one struct
l7_peek through BPF_PROG_TEST_RUN; hypothesis feeds it random bytes and each protocol's first
messages (tests/support/l7wire.py), with random lengths, directions, transports, ports and
call lengths. Kernel and Python must agree on every input, every protocol's own first
messages must be claimed by it alone, and none may claim an HTTP/1.x request or response or
the HTTP/2 preface.

Needs: BPF_PROG_TYPE_SYSCALL with BPF_PROG_TEST_RUN (Linux 5.14+), clang.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probewire.l7 import constants as c
from probewire.l7.protocol import Direction, Protocol, Role, Transport
from probewire.l7.registry import PROTOCOLS as ALL_PROTOCOLS
from probewire.runtime.bpf import BpfObject, Program
from support import l7wire as w
from support.bpf_build import compile_bpf

pytestmark = pytest.mark.bpf

HARNESS = Path(__file__).with_name("l7_classify_harness.bpf.c")
PEEK = np.dtype([("data", np.uint8, (c.L7_PEEK,)), ("len", np.uint32), ("dir", np.uint8),
                 ("transport", np.uint8), ("lport", np.uint16), ("rport", np.uint16),
                 ("_pad", np.uint16), ("call_len", np.uint32)])
IO = np.dtype([("peek", PEEK), ("role", np.uint8, (c.Proto.COUNT,)),
               ("http_method", np.uint32), ("http_status", np.uint32)])
# The byte-stream protocols (HTTP's classifiers have tests of their own).
PROTOCOLS = tuple(p for p in ALL_PROTOCOLS if p.kind != "http")
FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Program]:
    out = compile_bpf(HARNESS, tmp_path_factory.mktemp("harness") / "l7_classify.bpf.o")
    obj = BpfObject(out)
    obj.load()
    try:
        yield obj.programs["classify"]
    finally:
        obj.close()


def kernel(prog: Program, data: bytes, direction: Direction, transport: Transport,
           lport: int, rport: int, call_len: int) -> np.void:
    io = np.zeros(1, IO)
    peek = data[: c.L7_PEEK]
    io["peek"]["data"][0][: len(peek)] = np.frombuffer(peek, np.uint8)
    io["peek"]["len"], io["peek"]["dir"] = len(peek), int(direction)
    io["peek"]["transport"], io["peek"]["lport"], io["peek"]["rport"] = int(transport), lport, \
        rport
    io["peek"]["call_len"] = call_len
    rc, out = prog.test_run(io.tobytes())
    assert rc == 0
    return np.frombuffer(out, IO)[0]


def python(proto: Protocol, data: bytes, direction: Direction, transport: Transport,
           lport: int, rport: int, call_len: int) -> Role:
    return proto.classify(data[: c.L7_PEEK], direction, transport, lport=lport, rport=rport,
                          call_len=call_len)


def check_agree(prog: Program, data: bytes, direction: Direction, transport: Transport,
                lport: int, rport: int, call_len: int) -> dict[str, Role]:
    got = kernel(prog, data, direction, transport, lport, rport, call_len)
    roles = {}
    for proto in PROTOCOLS:
        want = python(proto, data, direction, transport, lport, rport, call_len)
        assert Role(int(got["role"][proto.proto_id])) == want, (proto.name, data)
        roles[proto.name] = want
    return roles


def firsts() -> list[tuple[str, bytes, Direction, int]]:
    """(protocol, first bytes of a call, direction from the sender, port at the server)."""
    out: list[tuple[str, bytes, Direction, int]] = [
        ("postgresql", w.pg_ssl_request(), Direction.OUT, 5432),
        ("postgresql", w.pg_startup("app", "shop"), Direction.OUT, 5432),
        ("postgresql", w.pg_cancel(), Direction.OUT, 5432),
        ("postgresql", w.pg_query("SELECT 1"), Direction.OUT, 5432),
        ("postgresql", w.pg_parse("_pg3_0", "SELECT * FROM t") + w.pg_bind("", "_pg3_0")
         + w.pg_execute() + w.pg_sync(), Direction.OUT, 5432),
        ("postgresql", w.pg_bind("", "s1") + w.pg_execute() + w.pg_sync(), Direction.OUT, 5432),
        ("mysql", w.my_greeting(), Direction.IN, 3306),
        ("mysql", w.my_greeting("8.0.36"), Direction.IN, 3306),
        ("mysql", w.my(0, b"\x03SELECT * FROM users"), Direction.OUT, 3306),
        ("mysql", w.my(0, b"\x16INSERT INTO t VALUES (?)"), Direction.OUT, 3306),
        ("mysql", w.my(0, b"\x17\x01\0\0\0\0\x01\0\0\0"), Direction.OUT, 3306),
        ("mysql", w.my(0, b"\x02shop"), Direction.OUT, 3306),
        ("mysql", w.my(0, b"\x0e"), Direction.OUT, 3306),
        ("redis", w.resp_cmd("PING"), Direction.OUT, 6379),
        ("redis", w.resp_cmd("HELLO", "3"), Direction.OUT, 6379),
        ("redis", w.resp_cmd("set", "k" * 40, "v" * 100), Direction.OUT, 6379),
        ("memcached", b"get k1 k2\r\n", Direction.OUT, 11211),
        ("memcached", b"set k 0 0 5\r\nhello\r\n", Direction.OUT, 11211),
        ("memcached", b"mg foo v\r\n", Direction.OUT, 11211),
        ("memcached", b"version\r\n", Direction.OUT, 11211),
        ("memcached", b"stats\r\n", Direction.OUT, 11211),
    ]
    # Query ids 1233 (AD set, as dig asks) and 1235 (CD set) besides a plain 1234.
    for (name, rdtype), qid in zip((("example.com", "A"), ("x.test", "AAAA"),
                                    ("_http._tcp.s", "SRV")), (1234, 1233, 1235), strict=True):
        q, r = w.dns_pair(qid, name, rdtype, 0)
        out += [("dns", q, Direction.OUT, 53), ("dns", r, Direction.IN, 53)]
    return out


HTTP = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"POST /api HTTP/1.1\r\nContent-Length: 2",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"DELETE /x HTTP/1.0\r\n\r\n", b"HTTP/1.0 404 Not Found\r\n\r\n"]


@pytest.mark.parametrize(("name", "data", "direction", "port"), firsts(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_first_messages_are_claimed_by_their_protocol_alone(
        harness: Program, name: str, data: bytes, direction: Direction, port: int) -> None:
    transports = [Transport.UDP, Transport.TCP] if name == "dns" else [Transport.TCP]
    for transport in transports:
        msg = len(data).to_bytes(2, "big") + data if name == "dns" and \
            transport == Transport.TCP else data
        for d in (direction, Direction.IN if direction == Direction.OUT else Direction.OUT):
            sender = d == direction  # the process that sent it, or the one that received it
            lport, rport = (40000, port) if sender == (name != "mysql" or data[4:5] != b"\n") \
                else (port, 40000)
            if name == "mysql" and data[4:5] == b"\n":
                lport, rport = (port, 40000) if d == Direction.OUT else (40000, port)
            roles = check_agree(harness, msg, d, transport, lport, rport, len(msg))
            claimed = {k for k, v in roles.items() if v != Role.UNKNOWN}
            assert claimed == {name}, (claimed, d)
            got = kernel(harness, msg, d, transport, lport, rport, len(msg))
            assert int(got["http_method"]) == 0 and int(got["http_status"]) == 0


@pytest.mark.parametrize("data", HTTP)
def test_no_protocol_claims_http(harness: Program, data: bytes) -> None:
    for d in Direction:
        for port in (80, 53, 5432):
            roles = check_agree(harness, data, d, Transport.TCP, port, 40000, len(data))
            assert set(roles.values()) == {Role.UNKNOWN}


def _peeks() -> st.SearchStrategy[bytes]:
    firsts_ = [f[1] for f in firsts()] + HTTP
    mutated = st.tuples(st.sampled_from(firsts_), st.integers(0, 40), st.binary(max_size=4)) \
        .map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]):])
    return st.one_of(st.binary(max_size=40), st.sampled_from(firsts_), mutated)


@settings(max_examples=1500, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=_peeks(), direction=st.sampled_from(list(Direction)),
       transport=st.sampled_from(list(Transport)),
       lport=st.sampled_from([53, 5432, 40000]), rport=st.sampled_from([53, 3306, 40001]),
       extra=st.sampled_from([0, 0, 1, 5, 1000]))
def test_kernel_classifiers_agree_with_python_on_any_bytes(
        harness: Program, data: bytes, direction: Direction, transport: Transport, lport: int,
        rport: int, extra: int) -> None:
    check_agree(harness, data, direction, transport, lport, rport, len(data) + extra)
