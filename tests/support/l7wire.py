"""Wire bytes of the L7 protocols, for parser and classifier tests, with their ground truth.

Builders write messages exactly as the protocols specify them (PostgreSQL frontend/backend
3.0, MySQL 4.1 packets, RESP2/3, memcached text, DNS through dnspython). The hypothesis
strategies draw whole conversations: ``Round`` = the requests a client writes at once, the
server's answer, and the exchanges a parser must report for them (operation, target, status,
namespace).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
from hypothesis import strategies as st

Expected = tuple[str, str, str, str]  # operation, target, status, namespace


@dataclass
class Round:
    request: bytes
    response: bytes
    expected: list[Expected] = field(default_factory=list)


# -- PostgreSQL --------------------------------------------------------------------------------
def pg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack(">I", len(body) + 4) + body


def pg_startup(user: str, database: str | None) -> bytes:
    params = b"user\0" + user.encode() + b"\0"
    if database is not None:
        params += b"database\0" + database.encode() + b"\0"
    body = struct.pack(">I", 196608) + params + b"\0"
    return struct.pack(">I", len(body) + 4) + body


def pg_ssl_request() -> bytes:
    return struct.pack(">II", 8, 80877103)


def pg_cancel() -> bytes:
    return struct.pack(">IIII", 16, 80877102, 1234, 5678)


def pg_query(sql: str) -> bytes:
    return pg(b"Q", sql.encode() + b"\0")


def pg_parse(name: str, sql: str, nparams: int = 0) -> bytes:
    return pg(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack(">H", nparams)
              + b"\0\0\0\x17" * nparams)


def pg_bind(portal: str, stmt: str, params: list[bytes] | None = None) -> bytes:
    params = params or []
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack(">H", 0)
    body += struct.pack(">H", len(params))
    for p in params:
        body += struct.pack(">i", len(p)) + p
    return pg(b"B", body + struct.pack(">H", 0))


def pg_describe(what: bytes, name: str) -> bytes:
    return pg(b"D", what + name.encode() + b"\0")


def pg_execute(portal: str = "") -> bytes:
    return pg(b"E", portal.encode() + b"\0" + struct.pack(">I", 0))


def pg_sync() -> bytes:
    return pg(b"S")


def pg_ready(status: bytes = b"I") -> bytes:
    return pg(b"Z", status)


def pg_complete(tag: str) -> bytes:
    return pg(b"C", tag.encode() + b"\0")


def pg_error(sqlstate: str, message: str = "boom") -> bytes:
    return pg(b"E", b"SERROR\0VERROR\0C" + sqlstate.encode() + b"\0M" + message.encode()
              + b"\0\0")


def pg_rows(n: int, width: int) -> bytes:
    desc = pg(b"T", struct.pack(">H", 1) + b"col\0" + b"\0" * 18)
    row = pg(b"D", struct.pack(">HI", 1, width) + b"v" * width)
    return desc + row * n


def pg_login(user: str, database: str | None) -> tuple[bytes, bytes]:
    """(client bytes, server bytes) of a trust login."""
    server = (pg(b"R", b"\0\0\0\0") + pg(b"S", b"server_version\x0016.1\0")
              + pg(b"K", b"\0\0\0\1\0\0\0\2") + pg_ready())
    return pg_startup(user, database), server


PG_STATEMENTS = [
    # sql, operation, table, CommandComplete tag, returns rows
    ("SELECT id, name FROM users WHERE id = 42", "SELECT", "users", "SELECT 1", True),
    ("select * from public.orders o join users u on u.id = o.uid", "SELECT", "public.orders",
     "SELECT 3", True),
    ("INSERT INTO orders (uid, note) VALUES (7, 'semi;colon ''q''')", "INSERT", "orders",
     "INSERT 0 1", False),
    ("UPDATE items SET n = n + 1 WHERE sku = 'x'", "UPDATE", "items", "UPDATE 2", False),
    ("DELETE FROM carts WHERE age > 30", "DELETE", "carts", "DELETE 0", False),
    ("WITH t AS (SELECT 1 FROM a) SELECT * FROM t", "SELECT", "t", "SELECT 1", True),
    ("BEGIN", "BEGIN", "", "BEGIN", False),
    ("COMMIT", "COMMIT", "", "COMMIT", False),
    ("SELECT $1::int + 1", "SELECT", "", "SELECT 1", True),
]
PG_ERRORS = ["42601", "42P01", "23505", "22012", "40001"]


@st.composite
def pg_conversation(draw: st.DrawFn) -> list[Round]:
    db = draw(st.sampled_from(["shop", "analytics", None]))
    user = "app"
    client, server = pg_login(user, db)
    ns = db or user
    rounds: list[Round] = []
    if draw(st.booleans()):
        rounds.append(Round(pg_ssl_request(), b"N"))
    rounds.append(Round(client, server))
    prepared: dict[str, tuple[str, str, str, bool]] = {}
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["simple", "extended", "prepared"]))
        if kind == "prepared" and not prepared:
            kind = "extended"
        rows = draw(st.integers(0, 5))
        width = draw(st.sampled_from([1, 10, 300, 5000]))
        if kind == "simple":
            picks = draw(st.lists(st.sampled_from(PG_STATEMENTS), min_size=1, max_size=3))
            fail_at = draw(st.one_of(st.none(), st.integers(0, len(picks) - 1)))
            request = pg_query("; ".join(p[0] for p in picks))
            response, expected = b"", []
            for i, (_, op, table, tag, returns) in enumerate(picks):
                if i == fail_at:
                    state = draw(st.sampled_from(PG_ERRORS))
                    response += pg_error(state)
                    expected.append((op, table, state, ns))
                    break
                response += (pg_rows(rows, width) if returns else b"") + pg_complete(tag)
                expected.append((op, table, "", ns))
            rounds.append(Round(request, response + pg_ready(), expected))
            continue
        if kind == "extended":
            sql, op, table, tag, returns = draw(st.sampled_from(PG_STATEMENTS))
            name = draw(st.sampled_from(["", "_pg3_0", "_pg3_1", "s1"]))
            fail = draw(st.sampled_from([None, "parse", "execute"]))
            request = (pg_parse(name, sql) + pg_bind("", name, [b"7"]) + pg_describe(b"P", "")
                       + pg_execute() + pg_sync())
            state = draw(st.sampled_from(PG_ERRORS))
            if fail == "parse":
                response = pg_error(state)
                prepared.pop(name, None)
                expected = [(op, table, state, ns)]
            else:
                # Describe's RowDescription (or NoData), then Execute's rows
                response = pg(b"1") + pg(b"2") + (pg_rows(rows, width) if returns else pg(b"n"))
                if fail == "execute":
                    response += pg_error(state)
                    expected = [(op, table, state, ns)]
                else:
                    response += pg_complete(tag)
                    expected = [(op, table, "", ns)]
                if name:
                    prepared[name] = (op, table, tag, returns)
            rounds.append(Round(request, response + pg_ready(), expected))
            continue
        name = draw(st.sampled_from(sorted(prepared)))
        op, table, tag, returns = prepared[name]
        times = draw(st.integers(1, 3))
        request = b"".join(pg_bind("", name, [b"1"]) + pg_execute() for _ in range(times))
        response = (pg(b"2") + (pg_rows(rows, width)[len(pg_rows(0, 0)):] if returns else b"")
                    + pg_complete(tag)) * times
        rounds.append(Round(request + pg_sync(), response + pg_ready(),
                            [(op, table, "", ns)] * times))
    return rounds


# -- MySQL -------------------------------------------------------------------------------------
def my(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq & 0xFF]) + payload


def my_lenenc(n: int) -> bytes:
    if n < 0xFB:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfc" + struct.pack("<H", n)
    if n < 1 << 24:
        return b"\xfd" + struct.pack("<I", n)[:3]
    return b"\xfe" + struct.pack("<Q", n)


def my_greeting(version: str = "5.5.5-10.11.6-MariaDB-0+deb12u1") -> bytes:
    caps = 0xF7FF | (0x81BF << 16)
    body = (b"\x0a" + version.encode() + b"\0" + struct.pack("<I", 42) + b"12345678\0"
            + struct.pack("<H", caps & 0xFFFF) + b"\x2d" + struct.pack("<H", 2)
            + struct.pack("<H", caps >> 16) + b"\x15" + b"\0" * 10 + b"123456789012\0"
            + b"mysql_native_password\0")
    return my(0, body)


CAPS = 0x000FA685 | 0x8 | 0x10000 | 0x20000  # 4.1, secure conn, plugin auth, multi stmts/res
DEPRECATE_EOF = 1 << 24


def my_handshake_response(user: str, db: str | None, deprecate_eof: bool) -> bytes:
    caps = CAPS | (DEPRECATE_EOF if deprecate_eof else 0)
    if db is None:
        caps &= ~0x8
    body = struct.pack("<IIB", caps, 1 << 24, 45) + b"\0" * 23 + user.encode() + b"\0"
    body += b"\x14" + b"s" * 20
    if db is not None:
        body += db.encode() + b"\0"
    body += b"mysql_native_password\0"
    return my(1, body)


def my_ok(seq: int, status: int = 2, affected: int = 0, header: int = 0) -> bytes:
    return my(seq, bytes([header]) + my_lenenc(affected) + my_lenenc(0)
              + struct.pack("<HH", status, 0))


def my_eof(seq: int, status: int = 2) -> bytes:
    return my(seq, b"\xfe" + struct.pack("<HH", 0, status))


def my_err(seq: int, code: int, state: str = "42000", msg: str = "bad") -> bytes:
    return my(seq, b"\xff" + struct.pack("<H", code) + b"#" + state.encode() + msg.encode())


def my_coldef(seq: int, name: str) -> bytes:
    parts = [b"def", b"db", b"t", b"t", name.encode(), name.encode()]
    return my(seq, b"".join(my_lenenc(len(p)) + p for p in parts)
              + b"\x0c" + struct.pack("<HIBHB", 45, 255, 253, 0, 0) + b"\0\0")


def my_resultset(seq: int, ncols: int, rows: list[bytes], deprecate_eof: bool,
                 status: int = 2, binary: bool = False) -> tuple[bytes, int]:
    """(bytes, next seq) of a result set whose rows are given as payloads."""
    out = my(seq, my_lenenc(ncols))
    seq += 1
    for i in range(ncols):
        out += my_coldef(seq, f"c{i}")
        seq += 1
    if not deprecate_eof:
        out += my_eof(seq)
        seq += 1
    for row in rows:
        out += my(seq, (b"\0\0" if binary else b"") + row)
        seq += 1
    out += (my_ok(seq, status, header=0xFE) if deprecate_eof else my_eof(seq, status))
    return out, seq + 1


def my_text_row(ncols: int, width: int) -> bytes:
    return (my_lenenc(width) + b"x" * width) * ncols


MY_STATEMENTS = [
    ("SELECT id, name FROM users WHERE id = 42", "SELECT", "users", True),
    ("select * from `shop`.`orders` o join users u on u.id = o.uid", "SELECT", "shop.orders",
     True),
    ("INSERT INTO orders (uid, note) VALUES (7, 'it\\'s; fine')", "INSERT", "orders", False),
    ("UPDATE items SET n = n + 1 WHERE sku = \"x\"", "UPDATE", "items", False),
    ("DELETE FROM carts WHERE age > 30", "DELETE", "carts", False),
    ("REPLACE INTO kv VALUES (1, 2)", "REPLACE", "kv", False),
    ("BEGIN", "BEGIN", "", False),
]
MY_ERRORS = [1064, 1146, 1054, 1062, 1213]


@st.composite
def mysql_conversation(draw: st.DrawFn) -> list[Round]:
    deprecate = draw(st.booleans())
    db = draw(st.sampled_from(["shop", None]))
    ns = db or ""
    rounds = [Round(b"", my_greeting()),
              Round(my_handshake_response("app", db, deprecate), my_ok(2))]
    prepared: dict[int, tuple[str, str, bool]] = {}
    next_id = 1
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["query", "multi", "prepare", "execute", "init_db", "ping",
                                     "close"]))
        if kind == "execute" and not prepared:
            kind = "prepare"
        rows = [my_text_row(2, draw(st.sampled_from([1, 30, 300]))) for _ in
                range(draw(st.integers(0, 4)))]
        if kind in ("query", "multi"):
            picks = draw(st.lists(st.sampled_from(MY_STATEMENTS), min_size=1,
                                  max_size=1 if kind == "query" else 3))
            fail_at = draw(st.one_of(st.none(), st.integers(0, len(picks) - 1)))
            request = my(0, b"\x03" + "; ".join(p[0] for p in picks).encode())
            response, expected, seq = b"", [], 1
            for i, (_, op, table, returns) in enumerate(picks):
                more = 0x8 if i < len(picks) - 1 else 0
                if i == fail_at:
                    code = draw(st.sampled_from(MY_ERRORS))
                    response += my_err(seq, code)
                    expected.append((op, table, str(code), ns))
                    break
                if returns:
                    part, seq = my_resultset(seq, 2, rows, deprecate, 2 | more)
                    response += part
                else:
                    response += my_ok(seq, 2 | more, affected=1)
                    seq += 1
                expected.append((op, table, "", ns))
            rounds.append(Round(request, response, expected))
        elif kind == "prepare":
            sql = f"{draw(st.sampled_from(['SELECT a FROM', 'DELETE FROM']))} t{next_id}"
            op, table, returns = sql.split()[0], f"t{next_id}", sql.startswith("SELECT")
            if draw(st.integers(0, 4)) == 0:
                code = draw(st.sampled_from(MY_ERRORS))
                rounds.append(Round(my(0, b"\x16" + sql.encode()), my_err(1, code),
                                    [(op, table, str(code), ns)]))
                continue
            nparams, ncols = draw(st.integers(0, 2)), (1 if returns else 0)
            response = my(1, b"\0" + struct.pack("<IHHBH", next_id, ncols, nparams, 0, 0))
            seq = 2
            for block in (nparams, ncols):
                for _ in range(block):
                    response += my_coldef(seq, "?")
                    seq += 1
                if block and not deprecate:
                    response += my_eof(seq)
                    seq += 1
            rounds.append(Round(my(0, b"\x16" + sql.encode()), response))
            prepared[next_id] = (op, table, returns)
            next_id += 1
        elif kind == "execute":
            sid = draw(st.sampled_from(sorted(prepared)))
            op, table, returns = prepared[sid]
            request = my(0, b"\x17" + struct.pack("<IBI", sid, 0, 1))
            if draw(st.integers(0, 4)) == 0:
                code = draw(st.sampled_from(MY_ERRORS))
                rounds.append(Round(request, my_err(1, code), [(op, table, str(code), ns)]))
            elif returns:
                part, _ = my_resultset(1, 1, rows, deprecate, binary=True)
                rounds.append(Round(request, part, [(op, table, "", ns)]))
            else:
                rounds.append(Round(request, my_ok(1, affected=3), [(op, table, "", ns)]))
        elif kind == "init_db":
            ns = draw(st.sampled_from(["shop", "other"]))
            rounds.append(Round(my(0, b"\x02" + ns.encode()), my_ok(1)))
        elif kind == "ping":
            rounds.append(Round(my(0, b"\x0e"), my_ok(1)))
        else:
            rounds.append(Round(my(0, b"\x19" + struct.pack("<I", 999)), b""))
    return rounds


# -- Redis -------------------------------------------------------------------------------------
def resp_cmd(*args: bytes | str) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def resp_bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def resp_array(items: list[bytes], kind: bytes = b"*") -> bytes:
    return kind + b"%d\r\n" % len(items) + b"".join(items)


WRONGTYPE = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"


@st.composite
def redis_reply_for(draw: st.DrawFn, resp3: bool) -> tuple[bytes, bytes, str, str]:
    """(command, reply, operation, status)."""
    size = draw(st.sampled_from([0, 5, 100, 4000]))
    value = b"v" * size
    kind = draw(st.sampled_from(["get", "set", "incr", "lrange", "hgetall", "unknown", "del",
                                 "ping"]))
    if kind == "get":
        return (resp_cmd("GET", "k"), resp_bulk(draw(st.sampled_from([None, value]))), "GET",
                "")
    if kind == "set":
        return resp_cmd("set", "k", value), b"+OK\r\n", "SET", ""
    if kind == "incr":
        if draw(st.booleans()):
            return resp_cmd("INCR", "n"), b":12\r\n", "INCR", ""
        return resp_cmd("INCR", "l"), WRONGTYPE, "INCR", "WRONGTYPE"
    if kind == "lrange":
        items = [resp_bulk(value) for _ in range(draw(st.integers(0, 4)))]
        return resp_cmd("LRANGE", "l", "0", "-1"), resp_array(items), "LRANGE", ""
    if kind == "hgetall":
        items = [resp_bulk(b"f"), resp_bulk(value)] * draw(st.integers(0, 3))
        if resp3:
            return (resp_cmd("HGETALL", "h"), b"%%%d\r\n" % (len(items) // 2) + b"".join(items),
                    "HGETALL", "")
        return resp_cmd("HGETALL", "h"), resp_array(items), "HGETALL", ""
    if kind == "unknown":
        return (resp_cmd("FOO", "x"), b"-ERR unknown command 'FOO', with args\r\n", "FOO",
                "ERR")
    if kind == "del":
        return resp_cmd("DEL", "a", "b"), b":2\r\n", "DEL", ""
    if resp3:
        return b"PING\r\n", b"+PONG\r\n", "PING", ""
    return resp_cmd("PING"), b"+PONG\r\n", "PING", ""


@st.composite
def redis_conversation(draw: st.DrawFn) -> list[Round]:
    rounds: list[Round] = []
    resp3 = draw(st.booleans())
    ns = ""
    if resp3:
        rounds.append(Round(resp_cmd("HELLO", "3"), b"%1\r\n+proto\r\n:3\r\n",
                            [("HELLO", "", "", "")]))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["single", "pipeline", "multi", "select", "push"]))
        if kind == "select":
            db = draw(st.sampled_from(["0", "3"]))
            rounds.append(Round(resp_cmd("SELECT", db), b"+OK\r\n", [("SELECT", "", "", ns)]))
            ns = db
        elif kind == "push" and resp3:
            # out of band: never paired; then an ordinary command
            cmd, reply, op, status = draw(redis_reply_for(resp3))
            push = resp_array([resp_bulk(b"message"), resp_bulk(b"ch"), resp_bulk(b"x")], b">")
            rounds.append(Round(cmd, push + reply, [(op, "", status, ns)]))
        elif kind == "multi":
            cmds = [draw(redis_reply_for(resp3)) for _ in range(draw(st.integers(1, 3)))]
            request = resp_cmd("MULTI") + b"".join(
                c[0] if c[0][:1] == b"*" else resp_cmd("PING") for c in cmds) + resp_cmd("EXEC")
            elems = [c[1] if c[0][:1] == b"*" else b"+PONG\r\n" for c in cmds]
            response = b"+OK\r\n" + b"+QUEUED\r\n" * len(cmds) + resp_array(elems)
            expected = [("MULTI", "", "", ns)] + [(c[2], "", c[3], ns) for c in cmds] + [
                ("EXEC", "", "", ns)]
            rounds.append(Round(request, response, expected))
        else:
            cmds = [draw(redis_reply_for(resp3))
                    for _ in range(1 if kind == "single" else draw(st.integers(2, 5)))]
            rounds.append(Round(b"".join(c[0] for c in cmds), b"".join(c[1] for c in cmds),
                                [(c[2], "", c[3], ns) for c in cmds]))
    return rounds


# -- memcached ---------------------------------------------------------------------------------
@st.composite
def memcached_conversation(draw: st.DrawFn) -> list[Round]:
    # a connection starts with a command of the protocol (what classified it)
    rounds: list[Round] = [Round(b"version\r\n", b"VERSION 1.6.18\r\n",
                                 [("VERSION", "", "", "")])]
    for _ in range(draw(st.integers(1, 8))):
        size = draw(st.sampled_from([0, 3, 200, 5000]))
        value = b"d" * size
        kind = draw(st.sampled_from(["set", "set_noreply", "get", "gets_multi", "delete",
                                     "incr", "incr_bad", "unknown", "mg", "mg_quiet", "ms",
                                     "version"]))
        if kind == "set":
            reply = draw(st.sampled_from([b"STORED", b"NOT_STORED", b"SERVER_ERROR out of mem"]))
            status = "SERVER_ERROR" if reply.startswith(b"SERVER") else ""
            rounds.append(Round(b"set k 0 0 %d\r\n%s\r\n" % (size, value), reply + b"\r\n",
                                [("SET", "", status, "")]))
        elif kind == "set_noreply":
            rounds.append(Round(b"add k 1 60 %d noreply\r\n%s\r\n" % (size, value), b"",
                                [("ADD", "", "", "")]))
        elif kind == "get":
            hit = draw(st.booleans())
            reply = (b"VALUE k 0 %d\r\n%s\r\n" % (size, value) if hit else b"") + b"END\r\n"
            rounds.append(Round(b"get k\r\n", reply, [("GET", "", "", "")]))
        elif kind == "gets_multi":
            n = draw(st.integers(1, 4))
            reply = b"".join(b"VALUE k%d 0 %d 77\r\n%s\r\n" % (i, size, value) for i in range(n))
            keys = b" ".join(b"k%d" % i for i in range(n + 1))
            rounds.append(Round(b"gets " + keys + b"\r\n", reply + b"END\r\n",
                                [("GETS", "", "", "")]))
        elif kind == "delete":
            reply = draw(st.sampled_from([b"DELETED", b"NOT_FOUND"]))
            rounds.append(Round(b"delete k\r\n", reply + b"\r\n", [("DELETE", "", "", "")]))
        elif kind == "incr":
            rounds.append(Round(b"incr n 5\r\n", b"17\r\n", [("INCR", "", "", "")]))
        elif kind == "incr_bad":
            rounds.append(Round(b"incr k 5\r\n", b"CLIENT_ERROR cannot increment or decrement "
                                b"non-numeric value\r\n", [("INCR", "", "CLIENT_ERROR", "")]))
        elif kind == "unknown":
            rounds.append(Round(b"bogus k\r\n", b"ERROR\r\n", [("", "", "ERROR", "")]))
        elif kind == "mg":
            hit = draw(st.booleans())
            reply = b"VA %d s%d\r\n%s\r\n" % (size, size, value) if hit else b"EN\r\n"
            rounds.append(Round(b"mg k v s\r\n", reply, [("MG", "", "", "")]))
        elif kind == "mg_quiet":
            hits = draw(st.lists(st.booleans(), min_size=1, max_size=4))
            request = b"".join(b"mg k%d v q k\r\n" % i for i in range(len(hits))) + b"mn\r\n"
            reply = b"".join(b"VA %d kk%d\r\n%s\r\n" % (size, i, value)
                             for i, h in enumerate(hits) if h) + b"MN\r\n"
            expected = [("MG", "", "", "")] * len(hits) + [("MN", "", "", "")]
            rounds.append(Round(request, reply, expected))
        elif kind == "ms":
            rounds.append(Round(b"ms k %d T60\r\n%s\r\n" % (size, value), b"HD\r\n",
                                [("MS", "", "", "")]))
        else:
            rounds.append(Round(b"version\r\n", b"VERSION 1.6.18\r\n",
                                [("VERSION", "", "", "")]))
    return rounds


# -- DNS ---------------------------------------------------------------------------------------
DNS_NAMES = ["example.com", "api.Internal.svc.cluster.local", "x.test", "a-b_c.test"]
DNS_TYPES = ["A", "AAAA", "SRV", "TXT", "PTR", "HTTPS", "TYPE65280"]


def dns_pair(qid: int, name: str, rdtype: str, rcode: int) -> tuple[bytes, bytes]:
    q = dns.message.make_query(name, rdtype, use_edns=(qid % 2 == 0))
    q.id = qid
    # Queries may ask for AD (dig does by default) and set CD (validating resolvers).
    if qid % 3 == 0:
        q.flags |= dns.flags.AD
    if qid % 5 == 0:
        q.flags |= dns.flags.CD
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    return q.to_wire(), r.to_wire()


@st.composite
def dns_exchanges(draw: st.DrawFn) -> list[tuple[bytes, bytes, Expected]]:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        name = draw(st.sampled_from(DNS_NAMES))
        rdtype = draw(st.sampled_from(DNS_TYPES))
        rcode = draw(st.sampled_from([0, 0, 3, 2, 5, 1]))
        q, r = dns_pair(draw(st.integers(0, 65535)), name, rdtype, rcode)
        status = "" if rcode == 0 else dns.rcode.to_text(rcode)
        out.append((q, r, (rdtype, name.lower(), status, "")))
    return out
