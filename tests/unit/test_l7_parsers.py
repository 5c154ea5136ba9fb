"""The L7 protocol parsers on conversations drawn by hypothesis (tests/support/l7wire.py).

Each conversation carries its ground truth, so every property is exact: the exchanges come out
the same (operation, target, status, namespace) whether the bytes arrive whole, split at random
boundaries, split at every single boundary, or with holes (bytes the capture skipped) inside
values; from the client's side and from the server's. Garbage never raises, and what a parser
makes of a stream cut at a message boundary it cannot see is never an exchange that was not
there.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from probewire.l7.protocol import (
    ConnInfo,
    Direction,
    Exchange,
    Protocol,
    Role,
    Segment,
    StreamParser,
    Transport,
)
from probewire.l7.protocols import dns, memcached, mysql, postgresql, redis
from probewire.l7.registry import PROTOCOLS as ALL_PROTOCOLS
from support import l7wire as w

Splitter = Callable[[bytes], list[tuple[bytes, int]]]  # -> (data, skipped) segments
CONVERSATIONS = {
    "postgresql": (postgresql.PROTOCOL, w.pg_conversation()),
    "mysql": (mysql.PROTOCOL, w.mysql_conversation()),
    "redis": (redis.PROTOCOL, w.redis_conversation()),
    "memcached": (memcached.PROTOCOL, w.memcached_conversation()),
}
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The byte-stream protocols (HTTP has tests of its own).
STREAM_PROTOCOLS = tuple(p for p in ALL_PROTOCOLS if p.kind != "http")


def whole(data: bytes) -> list[tuple[bytes, int]]:
    return [(data, 0)] if data else []


def run(proto: Protocol, rounds: list[w.Round], role: Role, split: Splitter,
        pipelined: bool = False) -> tuple[list[w.Expected], StreamParser, list[Exchange]]:
    parser = proto.parser(ConnInfo(Transport.TCP, role))
    asks = Direction.OUT if role == Role.CLIENT else Direction.IN
    answers = Direction.IN if role == Role.CLIENT else Direction.OUT
    out: list[Exchange] = []
    ts = 0
    # a client waits for the server during a login, and pipelines after it
    login = [r for r in rounds if r.request[:1] == b"\0" or r.response == b"N"]
    groups = ([[r] for r in login] + [rounds[len(login):]]) if pipelined \
        else [[r] for r in rounds]
    for group in groups:
        for direction, data in ((asks, b"".join(r.request for r in group)),
                                (answers, b"".join(r.response for r in group))):
            for chunk, skipped in split(data):
                ts += 1000
                out += parser.feed(Segment(direction, chunk, ts, tid=7, skipped=skipped))
    out += parser.close(ts + 1)
    return [(e.operation, e.target, e.status, e.namespace) for e in out], parser, out


def expected(rounds: Iterable[w.Round]) -> list[w.Expected]:
    return [e for r in rounds for e in r.expected]


def random_split(rnd: random.Random) -> Splitter:
    def split(data: bytes) -> list[tuple[bytes, int]]:
        out, pos = [], 0
        while pos < len(data):
            n = rnd.choice([1, 2, 3, 5, 8, 13, 64, 1000, 100000])
            out.append((data[pos: pos + n], 0))
            pos += n
        return out
    return split


FILLER = re.compile(rb"([vxd])\1{199,}")


def holes(data: bytes) -> list[tuple[bytes, int]]:
    """Segments of data with the middle of every long value (a run of filler bytes) skipped,
    as the kernel skips what it does not copy."""
    out, pos = [], 0
    for m in FILLER.finditer(data):
        a, b = m.start() + 10, m.end() - 10
        out.append((data[pos:a], b - a))
        pos = b
    out.append((data[pos:], 0))
    return [s for s in out if s[0] or s[1]]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_conversations_give_exactly_their_exchanges_whole_split_and_with_holes(
        name: str, role: Role) -> None:
    proto, conversation = CONVERSATIONS[name]

    @FAST
    @given(rounds=conversation, rnd=st.randoms(use_true_random=False))
    def check(rounds: list[w.Round], rnd: random.Random) -> None:
        want = expected(rounds)
        got, parser, exchanges = run(proto, rounds, role, whole)
        assert got == want, parser.failures
        assert not parser.failures, parser.failures
        assert all(e.end_ns >= e.start_ns and e.tid == 7 for e in exchanges)
        got, parser, _ = run(proto, rounds, role, random_split(rnd))
        assert got == want, parser.failures
        got, parser, _ = run(proto, rounds, role, holes)
        assert got == want, parser.failures

    check()


# The kernel's cut of a call too long to ship whole (256 KiB, then the last L7_TAIL bytes),
# scaled to the conversations' values.
CUT, TAIL = 6000, 512


def kernel_cut(data: bytes) -> list[tuple[bytes, int]]:
    """One call's bytes as the kernel ships them: its first CUT bytes, the middle skipped,
    its last TAIL bytes."""
    if len(data) <= CUT + TAIL:
        return whole(data)
    return [(data[:CUT], len(data) - CUT - TAIL), (data[-TAIL:], 0)]


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_memcached_replies_cut_by_the_kernel_through_their_value_lines_stay_exact(
        role: Role) -> None:
    """A multi-key reply whose middle (further VALUE lines included) the kernel skipped still
    ends at the END its call's last bytes carry; quiet meta commands, answered per VA block,
    cannot be paired through such a cut (their replies are kept short here)."""

    @FAST
    @given(rounds=w.memcached_conversation())
    def check(rounds: list[w.Round]) -> None:
        assume(not any(r.response.endswith(b"MN\r\n") and len(r.response) > CUT + TAIL
                       for r in rounds))
        got, parser, _ = run(memcached.PROTOCOL, rounds, role, kernel_cut)
        assert got == expected(rounds), parser.failures
        assert not parser.failures, parser.failures

    check()


@pytest.mark.parametrize("name", ["redis", "memcached", "postgresql"])
def test_pipelined_conversations_pair_in_order(name: str) -> None:
    proto, conversation = CONVERSATIONS[name]

    @FAST
    @given(rounds=conversation, rnd=st.randoms(use_true_random=False))
    def check(rounds: list[w.Round], rnd: random.Random) -> None:
        got, parser, _ = run(proto, rounds, Role.CLIENT, random_split(rnd), pipelined=True)
        # noreply commands end when they are sent, ahead of replies to earlier ones
        assert sorted(got) == sorted(expected(rounds)), parser.failures

    check()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_every_split_boundary_gives_the_same_exchanges(name: str) -> None:
    proto, conversation = CONVERSATIONS[name]

    @settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rounds=conversation)
    def check(rounds: list[w.Round]) -> None:
        want = expected(rounds)
        for i, target in enumerate(rounds):
            for which in ("request", "response"):
                data = getattr(target, which)
                if len(data) > 400:
                    continue
                for cut in range(1, len(data)):
                    def split(d: bytes, data: bytes = data, cut: int = cut) -> list[
                            tuple[bytes, int]]:
                        if d != data:
                            return whole(d)
                        return [(d[:cut], 0), (d[cut:], 0)]
                    got, parser, _ = run(proto, rounds, Role.CLIENT, split)
                    assert got == want, (i, which, cut, parser.failures)

    check()


@pytest.mark.parametrize("proto", STREAM_PROTOCOLS, ids=lambda p: p.name)
@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.tuples(st.booleans(), st.binary(max_size=300),
                                 st.integers(0, 5000)), max_size=30))
def test_garbage_never_raises(proto: Protocol, chunks: list[tuple[bool, bytes, int]]) -> None:
    for transport in proto.transports:
        for role in (Role.CLIENT, Role.SERVER):
            parser = proto.parser(ConnInfo(transport, role, remote=("127.0.0.1", 53)))
            for i, (out, data, skipped) in enumerate(chunks):
                d = Direction.OUT if out else Direction.IN
                assert isinstance(parser.feed(Segment(d, data, i, skipped=skipped % 7)), list)
            assert isinstance(parser.expire(10**12), list)
            assert isinstance(parser.close(10**12), list)


def claims_a_long_statement(name: str, junk: bytes) -> bool:
    """junk is the head of a statement longer than a parser holds unsynced (a Query, a
    COM_QUERY or COM_STMT_PREPARE of more than 64 KiB whose text begins as SQL does). That
    is exactly how the first call of a long statement looks, and a parser must take it on
    its head (it cannot hold the rest to prove it), so no parser can tell it from garbage."""
    held_max = 65536  # DuplexParser.max_buffer
    if len(junk) < 6 or not postgresql._sql_start(junk[5]):
        return False
    if name == "postgresql":
        return junk[0] == ord("Q") and int.from_bytes(junk[1:5], "big") + 1 > held_max
    if name == "mysql":
        return junk[3] == 0 and junk[4] in (mysql.COM_QUERY, mysql.COM_STMT_PREPARE) \
            and int.from_bytes(junk[:3], "little") + 4 > held_max
    return False


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_garbage_before_the_first_message_is_skipped_exactly(name: str) -> None:
    """A connection picked up mid-stream: bytes before a provable message start are skipped
    and everything from there on is exact."""
    proto, conversation = CONVERSATIONS[name]

    @FAST
    @given(rounds=conversation, rnd=st.randoms(use_true_random=False),
           junk=st.binary(min_size=1, max_size=40))
    def check(rounds: list[w.Round], rnd: random.Random, junk: bytes) -> None:
        # not itself the beginning of a message ("mn\r\n" is a memcached command)
        assume(b"\n" not in junk and junk[:1] != b"\0")
        assume(not claims_a_long_statement(name, junk))
        first = [True]

        def split(data: bytes) -> list[tuple[bytes, int]]:
            if first[0] and data:
                # The first message whole, as the call that sent it (a PostgreSQL start-up
                # message has no type byte: only its whole length proves where it starts).
                first[0] = False
                return [(junk, 0), *whole(data)]
            return random_split(rnd)(data)
        got, parser, _ = run(proto, rounds, Role.CLIENT, split)
        assert got == expected(rounds), parser.failures

    check()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_a_hole_across_message_boundaries_is_counted_and_parsing_goes_on(name: str) -> None:
    proto, conversation = CONVERSATIONS[name]

    @FAST
    @given(rounds=conversation, rnd=st.randoms(use_true_random=False))
    def check(rounds: list[w.Round], rnd: random.Random) -> None:
        done = [False]

        def damage(data: bytes) -> list[tuple[bytes, int]]:
            # bytes [a, b) not captured, reported as skipped after data[:a]
            if done[0] or not data or rnd.random() < 0.5:
                return random_split(rnd)(data)
            done[0] = True
            a = rnd.randrange(len(data))
            b = rnd.randrange(a, len(data)) + 1
            head = random_split(rnd)(data[:a]) or [(b"", 0)]
            return [*head[:-1], (head[-1][0], b - a), *random_split(rnd)(data[b:])]
        got, parser, exchanges = run(proto, rounds, Role.CLIENT, damage)
        assert len(got) <= len(expected(rounds)) + 1
        assert all(e.end_ns >= e.start_ns for e in exchanges)
        if done[0] and len(got) < len(expected(rounds)):
            assert parser.failures  # what was lost is counted

    check()


# -- PostgreSQL specifics ----------------------------------------------------------------------
def feed_all(parser: StreamParser, segments: list[tuple[Direction, bytes]]) -> list[Exchange]:
    out: list[Exchange] = []
    for i, (d, data) in enumerate(segments):
        out += parser.feed(Segment(d, data, (i + 1) * 1000))
    return out


OUT, IN = Direction.OUT, Direction.IN


def test_postgres_mid_stream_pickup_waits_for_a_proven_request() -> None:
    parser = postgresql.PROTOCOL.parser(ConnInfo(Transport.TCP, Role.CLIENT))
    rows = w.pg_rows(3, 20)
    got = feed_all(parser, [
        (IN, rows[7:] + w.pg_complete("SELECT 3") + w.pg_ready()),  # the tail of an old answer
        (OUT, w.pg_bind("", "_pg3_4") + w.pg_execute() + w.pg_sync()),  # statement unknown
        (IN, w.pg(b"2") + rows[len(w.pg_rows(0, 0)):] + w.pg_complete("SELECT 3")
         + w.pg_ready()),
        (OUT, w.pg_query("UPDATE users SET a = 1")),
        (IN, w.pg_complete("UPDATE 1") + w.pg_ready()),
    ])
    assert [(e.operation, e.target, e.namespace) for e in got] == [
        ("SELECT", "", ""), ("UPDATE", "users", "")]


def test_postgres_response_hole_across_messages_resyncs_at_ready_for_query() -> None:
    parser = postgresql.PROTOCOL.parser(ConnInfo(Transport.TCP, Role.CLIENT))
    client, server = w.pg_login("app", "shop")
    rows = w.pg_rows(50, 100)
    out = feed_all(parser, [(OUT, client), (IN, server),
                            (OUT, w.pg_query("SELECT * FROM big"))])
    # the kernel copied the first 1000 bytes of a large read, then the last read whole
    out += parser.feed(Segment(IN, rows[:1000], 5000, skipped=len(rows) - 1000 - 30))
    out += parser.feed(Segment(IN, rows[-30:] + w.pg_complete("SELECT 50") + w.pg_ready(),
                               6000))
    out += feed_all(parser, [(OUT, w.pg_query("DELETE FROM t")),
                             (IN, w.pg_complete("DELETE 2") + w.pg_ready())])
    assert [(e.operation, e.target, e.end_ns) for e in out][:1] == [("SELECT", "big", 6000)]
    assert [(e.operation, e.target) for e in out] == [("SELECT", "big"), ("DELETE", "t")]
    assert parser.failures["resynced_at_ready_for_query"] == 1


def test_postgres_named_statements_are_bounded_and_cancel_requests_ignored() -> None:
    parser = postgresql.PROTOCOL.parser(ConnInfo(Transport.TCP, Role.CLIENT))
    assert feed_all(parser, [(OUT, w.pg_cancel())]) == []
    parser = postgresql.PROTOCOL.parser(ConnInfo(Transport.TCP, Role.CLIENT))
    client, server = w.pg_login("app", None)
    feed_all(parser, [(OUT, client), (IN, server)])
    for i in range(postgresql.MAX_STATEMENTS + 10):
        feed_all(parser, [(OUT, w.pg_parse(f"s{i}", f"SELECT * FROM t{i}") + w.pg_sync()),
                          (IN, w.pg(b"1") + w.pg_ready())])
    assert len(parser.prepared) == postgresql.MAX_STATEMENTS  # type: ignore[attr-defined]
    assert parser.failures["statement_evicted"] == 10


def test_postgres_tls_ciphertext_is_ignored_and_plaintext_after_it_parsed() -> None:
    parser = postgresql.PROTOCOL.parser(ConnInfo(Transport.TCP, Role.CLIENT))
    client, server = w.pg_login("app", "db1")
    got = feed_all(parser, [
        (OUT, w.pg_ssl_request()), (IN, b"S"),
        (OUT, b"\x16\x03\x01\x00\xa0" + b"\x01" * 160),  # ClientHello on the socket
        (IN, b"\x16\x03\x03\x00\x10" + b"\x02" * 16),
        # the same connection's plaintext, as the TLS library hands it over
        (OUT, client), (IN, server),
        (OUT, w.pg_query("SELECT 1 FROM x")), (IN, w.pg_complete("SELECT 1") + w.pg_ready())])
    assert [(e.operation, e.target, e.namespace) for e in got] == [("SELECT", "x", "db1")]
    assert parser.failures["tls_ciphertext"] >= 1


# -- Redis / memcached specifics ---------------------------------------------------------------
def test_redis_resp2_pubsub_messages_are_not_replies() -> None:
    parser = redis.PROTOCOL.parser(ConnInfo(Transport.TCP, Role.CLIENT))
    msg = w.resp_array([w.resp_bulk(b"message"), w.resp_bulk(b"c1"), w.resp_bulk(b"hi")])
    confirm = [w.resp_array([w.resp_bulk(b"subscribe"), w.resp_bulk(c), b":%d\r\n" % i])
               for i, c in enumerate([b"c1", b"c2"], 1)]
    got = feed_all(parser, [(OUT, w.resp_cmd("SUBSCRIBE", "c1", "c2")),
                            (IN, confirm[0] + msg + confirm[1] + msg),
                            (OUT, w.resp_cmd("PING")),
                            (IN, msg + w.resp_array([w.resp_bulk(b"pong"), w.resp_bulk(b"")]))])
    assert [e.operation for e in got] == ["SUBSCRIBE", "PING"]


def test_redis_transaction_errors_and_aborts() -> None:
    parser = redis.PROTOCOL.parser(ConnInfo(Transport.TCP, Role.CLIENT))
    got = feed_all(parser, [
        (OUT, w.resp_cmd("MULTI") + w.resp_cmd("SET", "a", "1") + w.resp_cmd("NOPE")
         + w.resp_cmd("EXEC")),
        (IN, b"+OK\r\n+QUEUED\r\n-ERR unknown command 'NOPE'\r\n"
         b"-EXECABORT Transaction discarded because of previous errors.\r\n"),
        (OUT, w.resp_cmd("WATCH", "k") + w.resp_cmd("MULTI") + w.resp_cmd("INCR", "k")
         + w.resp_cmd("EXEC")),
        (IN, b"+OK\r\n+OK\r\n+QUEUED\r\n*-1\r\n")])
    assert [(e.operation, e.status) for e in got] == [
        ("MULTI", ""), ("NOPE", "ERR"), ("SET", "EXECABORT"), ("EXEC", "EXECABORT"),
        ("WATCH", ""), ("MULTI", ""), ("EXEC", "")]


def test_memcached_quiet_meta_commands_end_at_the_first_reply_not_theirs() -> None:
    parser = memcached.PROTOCOL.parser(ConnInfo(Transport.TCP, Role.CLIENT))
    got = feed_all(parser, [(OUT, b"ms a 1 q\r\nx\r\nms b 1 q O9\r\ny\r\nmd c q\r\nmn\r\n"),
                            (IN, b"NS O9\r\nNF\r\nMN\r\n")])
    assert [(e.operation, e.end_ns) for e in got] == [
        ("MS", 2000), ("MS", 2000), ("MD", 2000), ("MN", 2000)]


# -- DNS ---------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(pairs=w.dns_exchanges(), order=st.randoms(use_true_random=False),
       role=st.sampled_from([Role.CLIENT, Role.SERVER]), tcp=st.booleans())
def test_dns_pairs_by_id_and_question_in_any_order(
        pairs: list[tuple[bytes, bytes, w.Expected]], order: random.Random, role: Role,
        tcp: bool) -> None:
    assume(len({p[0] for p in pairs}) == len(pairs))  # the same query twice is a resend
    ask = Direction.OUT if role == Role.CLIENT else Direction.IN
    answer = Direction.IN if role == Role.CLIENT else Direction.OUT
    transport = Transport.TCP if tcp else Transport.UDP
    parser = dns.PROTOCOL.parser(ConnInfo(transport, role, remote=("10.0.0.1", 53)))
    responses = [p[1] for p in pairs]
    order.shuffle(responses)
    frame = (lambda m: len(m).to_bytes(2, "big") + m) if tcp else (lambda m: m)
    got: list[Exchange] = []
    for i, (q, _, _) in enumerate(pairs):
        got += parser.feed(Segment(ask, frame(q), i))
    for i, r in enumerate(responses):
        got += parser.feed(Segment(answer, frame(r), 100 + i))
    want = sorted(p[2] for p in pairs)
    keys = {(p[0][:2], p[2][:2]) for p in pairs}
    if len(keys) == len(pairs):  # distinct (id, question): pairing is exact
        assert sorted((e.operation, e.target, e.status, e.namespace) for e in got) == want
        assert all(e.error_type == e.status.lower() for e in got)
    assert len(got) + len(parser.close(10**9)) == len(pairs)


def test_dns_parallel_a_and_aaaa_with_one_id_are_two_exchanges_and_timeouts_expire() -> None:
    parser = dns.PROTOCOL.parser(ConnInfo(Transport.UDP, Role.CLIENT, remote=("127.0.0.1", 53)))
    qa, ra = w.dns_pair(7, "svc.test", "A", 0)
    q6, r6 = w.dns_pair(7, "svc.test", "AAAA", 3)
    qx, _ = w.dns_pair(8, "slow.test", "A", 0)
    got = feed_all(parser, [(OUT, qa), (OUT, q6), (OUT, qx), (IN, r6), (IN, ra)])
    assert [(e.operation, e.status, e.error_type) for e in got] == [
        ("AAAA", "NXDOMAIN", "nxdomain"), ("A", "", "")]
    assert parser.expire(3000 + dns.TIMEOUT_NS - 1) == []
    [late] = parser.expire(3000 + dns.TIMEOUT_NS)
    assert (late.operation, late.target, late.error_type) == ("A", "slow.test", "timeout")
    assert late.end_ns - late.start_ns == dns.TIMEOUT_NS


def test_dns_response_cut_by_the_capture_still_pairs() -> None:
    parser = dns.PROTOCOL.parser(ConnInfo(Transport.UDP, Role.CLIENT, remote=("127.0.0.1", 53)))
    q, r = w.dns_pair(99, "cut.example.org", "TXT", 2)
    parser.feed(Segment(OUT, q, 1))
    [ex] = parser.feed(Segment(IN, r[:40], 2, skipped=len(r) - 40))
    assert (ex.operation, ex.target, ex.status) == ("TXT", "cut.example.org", "SERVFAIL")


@settings(max_examples=150, deadline=None)
@given(labels=st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=6))
def test_dns_names_decode_like_dnspython(labels: list[bytes]) -> None:
    import dns.name as dname

    name = dname.Name([*labels, b""])
    q = dns.message_to_wire(name) if hasattr(dns, "message_to_wire") else None
    del q
    import dns.message as dmsg
    msg = dmsg.make_query(name, "A").to_wire()
    parsed = dns.parse(msg)
    assert parsed is not None
    assert parsed.qname == name.to_text(omit_final_dot=True).lower()


def test_dns_compression_loops_and_forward_pointers_are_refused() -> None:
    header = b"\0\1\x81\x80\0\1\0\0\0\0\0\0"
    assert dns.parse(header + b"\xc0\x0c" + b"\0\1\0\1") is None  # points at itself
    assert dns.parse(header + b"\x01a\xc0\x0e\0\1\0\1") is None  # forward
    assert dns.parse(header + b"\x3fa") is None  # truncated label
    assert dns.read_name(b"\x01a\0\x01b\xc0\0", 3) == ("b.a", 7)  # a backward pointer
