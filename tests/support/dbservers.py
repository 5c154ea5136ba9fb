"""Real database, cache and DNS servers from Debian's packages, and drivers with ground truth.

    with postgres_server() as pg:                 # also mariadb_server, redis_server, ...
        truth = pg_driver(pg.port, random.Random(1), n=40)   # Counter of exchanges made

Every server runs from a temporary directory on 127.0.0.1 (or in a network namespace, for
DNS) and is stopped and removed on exit, whatever happens. The drivers use the stock Python
client of each server and return their ground truth as a Counter of
(system, operation, collection, status): what a parser of the traffic must count, errors
included. The ``*_cli`` drivers use the stock command-line clients. Nothing here knows about
how the traffic is captured: the tests put a relay in front of a server (parser tests) or
the agent beside it (kernel tests) and point the driver at the port they want.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from support.servers import free_port, wait_port

Truth = Counter[tuple[str, str, str, str]]  # (system, operation, collection, status)
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class DbServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    host: str = "127.0.0.1"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# -- PostgreSQL --------------------------------------------------------------------------------
@contextlib.contextmanager
def postgres_server(port: int | None = None, tls: bool = False) -> Iterator[DbServer]:
    """PostgreSQL 15 as user postgres (it refuses root) on a fresh data directory: trust
    authentication for user app on database shop, fsync off. With `tls`, a self-signed
    certificate and ssl=on (clients then negotiate TLS through libssl when asked)."""
    port = port or free_port()
    tmp = Path(tempfile.mkdtemp(prefix="pw-pg-"))
    try:
        shutil.chown(tmp, "postgres", "postgres")
        data = tmp / "data"
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D",
                        str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        ssl: list[str] = []
        if tls:
            cert, key = tmp / "server.crt", tmp / "server.key"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", str(key),
                            "-out", str(cert)], check=True, capture_output=True, timeout=60)
            for path in (cert, key):
                shutil.chown(path, "postgres", "postgres")
            key.chmod(0o600)
            ssl = ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]
        proc = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "postgres"), "-D", str(data),
             "-p", str(port), "-k", str(tmp), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "shared_buffers=16MB", "-c", "max_connections=20", *ssl],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, 30)
            _psql(port, "postgres", "CREATE ROLE app LOGIN SUPERUSER; CREATE DATABASE shop "
                                    "OWNER app;", user="postgres")
            yield DbServer(port, proc, tmp)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _psql(port: int, db: str, sql: str, user: str = "app",
          sslmode: str = "disable") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", db,
                           "-X", "-q", "-v", "ON_ERROR_STOP=0", "-f", "-"], input=sql,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PGSSLMODE": sslmode})


PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (id serial PRIMARY KEY, name text, note text);
CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, uid int, total int);
"""
# (sql, operation, collection, sqlstate) a driver draws from; %(v)s is a random value.
PG_MIX = [
    ("SELECT id, name FROM users WHERE id = %(n)s", "SELECT", "users", ""),
    ("INSERT INTO users (name, note) VALUES (%(s)s, %(s)s)", "INSERT", "users", ""),
    ("UPDATE users SET note = %(s)s WHERE id = %(n)s", "UPDATE", "users", ""),
    ("DELETE FROM orders WHERE uid = %(n)s", "DELETE", "orders", ""),
    ("INSERT INTO orders (uid, total) VALUES (%(n)s, %(n)s)", "INSERT", "orders", ""),
    ("SELECT count(*) FROM orders o JOIN users u ON u.id = o.uid", "SELECT", "orders", ""),
    ("SELECT * FROM no_such_table", "SELECT", "no_such_table", "42P01"),
    ("SELEC 1", "SELEC", "", "42601"),
    ("SELECT 1 / 0 FROM users", "SELECT", "users", "22012"),
]


def pg_driver(port: int, rnd: random.Random, n: int, sslmode: str = "disable") -> Truth:
    """psycopg (pure Python, over Debian's libpq): a random mix of statements with random
    sizes and errors, some executed often enough to be prepared (psycopg prepares a statement
    at its 5th execution), some through the simple query protocol."""
    import psycopg

    truth: Truth = Counter()
    with psycopg.connect(host="127.0.0.1", port=port, user="app", dbname="shop",
                         autocommit=True, sslmode=sslmode) as conn:
        conn.execute(PG_SCHEMA)
        truth["postgresql", "CREATE", "users", ""] += 1
        truth["postgresql", "CREATE", "orders", ""] += 1
        for _ in range(n):
            sql, op, table, state = rnd.choice(PG_MIX)
            params = {"n": rnd.randrange(100), "s": "x" * rnd.choice([1, 10, 500, 20000])}
            # psycopg sends a statement with parameters through the extended protocol; one
            # without (prepare=False and no parameters) through the simple one
            simple = "%(" not in sql and rnd.random() < 0.5
            try:
                if simple:
                    conn.execute(sql.encode().decode(), prepare=False)
                else:
                    conn.execute(sql, params)
            except psycopg.Error as err:
                state = err.sqlstate or "?"
            truth["postgresql", op, table, state] += 1
    return truth


def pg_cli(port: int, rnd: random.Random, n: int, sslmode: str = "disable") -> Truth:
    """psql running a script: it sends each statement as its own simple Query."""
    truth: Truth = Counter()
    lines = []
    for _ in range(n):
        sql, op, table, state = rnd.choice(PG_MIX)
        lines.append(sql % {"n": rnd.randrange(100), "s": "'" + "y" * rnd.randrange(50) + "'"}
                     + ";")
        truth["postgresql", op, table, state] += 1
    result = _psql(port, "shop", "\n".join(lines), sslmode=sslmode)
    assert result.returncode == 0, result.stderr
    return truth


# -- MariaDB -----------------------------------------------------------------------------------
@contextlib.contextmanager
def mariadb_server(port: int | None = None) -> Iterator[DbServer]:
    """MariaDB on a fresh data directory (mariadb-install-db), user app without password on
    database shop, no networking but 127.0.0.1:port."""
    port = port or free_port()
    tmp = Path(tempfile.mkdtemp(prefix="pw-mariadb-"))
    try:
        shutil.chown(tmp, "mysql", "mysql")
        data = tmp / "data"
        subprocess.run(["mariadb-install-db", "--user=mysql", f"--datadir={data}",
                        "--auth-root-authentication-method=normal", "--skip-test-db",
                        "--skip-name-resolve"], check=True, capture_output=True, timeout=120)
        sock = tmp / "mysqld.sock"
        proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", "--user=mysql", f"--datadir={data}",
             f"--socket={sock}", f"--port={port}", "--bind-address=127.0.0.1",
             f"--pid-file={tmp / 'mysqld.pid'}", "--skip-grant-tables=0",
             "--innodb-buffer-pool-size=16M", "--innodb-flush-log-at-trx-commit=0",
             "--skip-log-bin", f"--log-error={tmp / 'error.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, 60)
            subprocess.run(["mariadb", f"--socket={sock}", "-uroot", "-e",
                            "CREATE DATABASE shop; CREATE USER 'app'@'127.0.0.1'; "
                            "GRANT ALL ON *.* TO 'app'@'127.0.0.1';"],
                           check=True, capture_output=True, timeout=60)
            yield DbServer(port, proc, tmp)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MY_SCHEMA = ["CREATE TABLE IF NOT EXISTS users (id int AUTO_INCREMENT PRIMARY KEY, "
             "name text, note mediumtext)",
             "CREATE TABLE IF NOT EXISTS orders (id int AUTO_INCREMENT PRIMARY KEY, uid int, "
             "total int)"]
MY_MIX = [
    ("SELECT id, name FROM users WHERE id = %(n)s", "SELECT", "users", ""),
    ("INSERT INTO users (name, note) VALUES (%(s)s, %(s)s)", "INSERT", "users", ""),
    ("UPDATE users SET note = %(s)s WHERE id = %(n)s", "UPDATE", "users", ""),
    ("DELETE FROM orders WHERE uid = %(n)s", "DELETE", "orders", ""),
    ("SELECT count(*) FROM orders o JOIN users u ON u.id = o.uid", "SELECT", "orders", ""),
    ("SELECT * FROM no_such_table", "SELECT", "no_such_table", "1146"),
    ("SELEC 1", "SELEC", "", "1064"),
    ("SELECT nope FROM users", "SELECT", "users", "1054"),
]


def mysql_driver(port: int, rnd: random.Random, n: int) -> Truth:
    """PyMySQL (COM_QUERY; it interpolates parameters itself): a random mix with errors."""
    import pymysql

    truth: Truth = Counter()
    conn = pymysql.connect(host="127.0.0.1", port=port, user="app", database="shop",
                           autocommit=True)
    try:
        with conn.cursor() as cur:
            for sql in MY_SCHEMA:
                cur.execute(sql)
                truth["mysql", "CREATE", sql.split()[5], ""] += 1
            for _ in range(n):
                sql, op, table, code = rnd.choice(MY_MIX)
                params = {"n": rnd.randrange(100), "s": "x" * rnd.choice([1, 10, 500, 20000])}
                try:
                    cur.execute(sql, params if "%(" in sql else None)
                    cur.fetchall()
                except pymysql.MySQLError as err:
                    code = str(err.args[0])
                truth["mysql", op, table, code] += 1
    finally:
        conn.close()
    return truth


def mysql_cli(port: int, rnd: random.Random, n: int) -> Truth:
    """The mariadb client running a script with --force (it goes on after errors)."""
    truth: Truth = Counter()
    lines = []
    for _ in range(n):
        sql, op, table, code = rnd.choice(MY_MIX)
        lines.append(sql % {"n": rnd.randrange(100), "s": "'" + "y" * rnd.randrange(50) + "'"}
                     + ";")
        truth["mysql", op, table, code] += 1
    subprocess.run(["mariadb", "-h", "127.0.0.1", "-P", str(port), "-u", "app", "--force",
                    "--skip-ssl", "shop"], input="\n".join(lines), capture_output=True,
                   text=True, timeout=60)
    return truth


# -- Redis -------------------------------------------------------------------------------------
@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[DbServer]:
    port = port or free_port()
    tmp = Path(tempfile.mkdtemp(prefix="pw-redis-"))
    try:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, 20)
            yield DbServer(port, proc, tmp)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def redis_driver(port: int, rnd: random.Random, n: int) -> Truth:
    """redis-py: single commands, pipelines (plain and MULTI/EXEC transactions), WRONGTYPE
    and unknown-command errors, random value sizes, RESP2 or RESP3."""
    import redis as redis_py

    truth: Truth = Counter()
    resp3 = rnd.random() < 0.5
    # lib_name/lib_version None: no CLIENT SETINFO on connect (Redis 7.0 answers it ERR)
    client = redis_py.Redis(host="127.0.0.1", port=port, protocol=3 if resp3 else 2,
                            lib_name=None, lib_version=None)
    client.ping()
    truth["redis", "PING", "", ""] += 1
    if resp3:
        truth["redis", "HELLO", "", ""] += 1
    try:
        for _ in range(n):
            kind = rnd.choice(["set", "get", "incr_bad", "lpush", "pipeline", "tx", "unknown"])
            value = b"v" * rnd.choice([1, 100, 5000, 100000])
            if kind == "set":
                client.set("k", value)
                truth["redis", "SET", "", ""] += 1
            elif kind == "get":
                client.get("k")
                truth["redis", "GET", "", ""] += 1
            elif kind == "lpush":
                client.lpush("l", value)
                truth["redis", "LPUSH", "", ""] += 1
            elif kind == "incr_bad":
                try:  # (a pipeline's INCR may have made "list" a number first)
                    client.lpush("list", "x")
                    truth["redis", "LPUSH", "", ""] += 1
                except redis_py.ResponseError as err:
                    truth["redis", "LPUSH", "", str(err).split()[0]] += 1
                try:  # redis-py's incr() sends INCRBY
                    client.incr("list")
                    truth["redis", "INCRBY", "", ""] += 1
                except redis_py.ResponseError:
                    truth["redis", "INCRBY", "", "WRONGTYPE"] += 1
            elif kind == "unknown":
                with contextlib.suppress(redis_py.ResponseError):
                    client.execute_command("NOSUCHCMD", "x")
                truth["redis", "NOSUCHCMD", "", "ERR"] += 1
            else:
                tx = kind == "tx"
                pipe = client.pipeline(transaction=tx)
                ops = [rnd.choice(["SET", "GET", "INCR", "DEL"]) for _ in range(rnd.randint(1, 8))]
                for op in ops:
                    if op == "SET":
                        pipe.set("p", value)
                    elif op == "GET":
                        pipe.get("p")
                    elif op == "INCR":
                        pipe.incr("list")
                    else:
                        pipe.delete("p")
                results = pipe.execute(raise_on_error=False)
                for op, res in zip(ops, results, strict=True):
                    status = str(res).split()[0] if isinstance(res, redis_py.ResponseError) \
                        else ""
                    truth["redis", "INCRBY" if op == "INCR" else op, "", status] += 1
                if tx:
                    truth["redis", "MULTI", "", ""] += 1
                    truth["redis", "EXEC", "", ""] += 1
        # redis-py's own on each RESP3 connection: CLIENT MAINT_NOTIFICATIONS (Redis 7.0: ERR)
        pool = client.connection_pool
        conns = len(pool._available_connections) + len(pool._in_use_connections)
        if resp3:
            truth["redis", "CLIENT", "", "ERR"] += conns
    finally:
        client.close()
    return +truth


def redis_cli(port: int, rnd: random.Random, n: int) -> Truth:
    """redis-cli reading commands from its standard input (one RESP array each)."""
    truth: Truth = Counter()
    lines = []
    for _ in range(n):
        kind = rnd.choice(["SET", "GET", "INCR", "BAD"])
        if kind == "SET":
            lines.append(f"SET cli{rnd.randrange(5)} {'z' * rnd.randrange(1, 300)}")
            truth["redis", "SET", "", ""] += 1
        elif kind == "GET":
            lines.append(f"GET cli{rnd.randrange(5)}")
            truth["redis", "GET", "", ""] += 1
        elif kind == "INCR":
            lines.append("LPUSH clilist a")
            lines.append("INCR clilist")
            truth["redis", "LPUSH", "", ""] += 1
            truth["redis", "INCR", "", "WRONGTYPE"] += 1
        else:
            lines.append("FOOBAR 1")
            truth["redis", "FOOBAR", "", "ERR"] += 1
    truth["redis", "COMMAND", "", ""] += 1  # redis-cli asks for COMMAND DOCS first
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port)],
                   input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60,
                   check=True)
    return truth


# -- memcached ---------------------------------------------------------------------------------
@contextlib.contextmanager
def memcached_server(port: int | None = None) -> Iterator[DbServer]:
    port = port or free_port()
    tmp = Path(tempfile.mkdtemp(prefix="pw-memcached-"))
    try:
        proc = subprocess.Popen(["memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(port),
                                 "-U", "0", "-m", "64", "-t", "2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, 20)
            yield DbServer(port, proc, tmp)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def memcached_driver(port: int, rnd: random.Random, n: int) -> Truth:
    """pymemcache: storage commands with and without noreply, multi-key gets, deletes,
    incr on a non-number (CLIENT_ERROR), random sizes."""
    from pymemcache.client.base import Client
    from pymemcache.exceptions import MemcacheClientError

    truth: Truth = Counter()
    client = Client(("127.0.0.1", port), default_noreply=False)
    try:
        for _ in range(n):
            kind = rnd.choice(["set", "set_noreply", "get", "get_many", "delete", "incr",
                               "incr_bad", "add", "get_big"])
            value = b"m" * rnd.choice([1, 100, 5000, 200000])
            if kind == "set":
                client.set("k", value)
                truth["memcached", "SET", "", ""] += 1
            elif kind == "set_noreply":
                client.set("k2", value, noreply=True)
                truth["memcached", "SET", "", ""] += 1
            elif kind == "add":
                client.add("k", value)
                truth["memcached", "ADD", "", ""] += 1
            elif kind == "get":
                client.get("k")
                truth["memcached", "GET", "", ""] += 1
            elif kind == "get_many":
                client.get_many(["k", "k2", "nothing"])
                truth["memcached", "GET", "", ""] += 1
            elif kind == "get_big":
                # Replies longer than the kernel ships whole (256 KiB): their last bytes (the
                # END after the values) still complete the exchange, also when the skipped
                # middle holds the second key's VALUE line.
                client.set("big", b"b" * rnd.randint(262_145, 1_000_000))
                client.set("big2", b"c" * rnd.randint(1, 500_000))
                assert client.get("big") is not None
                assert len(client.get_many(["big", "big2"])) == 2
                truth["memcached", "SET", "", ""] += 2
                truth["memcached", "GET", "", ""] += 2
            elif kind == "delete":
                client.delete("k3", noreply=False)
                truth["memcached", "DELETE", "", ""] += 1
            elif kind == "incr":
                client.set("n", b"5")
                client.incr("n", 3)
                truth["memcached", "SET", "", ""] += 1
                truth["memcached", "INCR", "", ""] += 1
            else:
                client.set("s", b"abc")
                truth["memcached", "SET", "", ""] += 1
                with contextlib.suppress(MemcacheClientError):
                    client.incr("s", 1)
                truth["memcached", "INCR", "", "CLIENT_ERROR"] += 1
    finally:
        client.close()
    return truth


# -- DNS ---------------------------------------------------------------------------------------
DNS_HOSTS = {"db.probewire.test": "10.1.2.3", "api.probewire.test": "10.1.2.4"}


@contextlib.contextmanager
def dns_server(netns: str | None = None, listen: str = "127.0.0.1",
               port: int = 53) -> Iterator[DbServer]:
    """dnsmasq answering the names in DNS_HOSTS (A only: their AAAA is an empty NOERROR),
    NXDOMAIN for any other name under probewire.test, REFUSED... no upstream: everything else
    gets REFUSED. In `netns` when given (glibc's resolver then reaches it through
    /etc/netns/<netns>/resolv.conf, see resolver_netns)."""
    tmp = Path(tempfile.mkdtemp(prefix="pw-dns-"))
    try:
        conf = tmp / "dnsmasq.conf"
        conf.write_text("".join(f"host-record={h},{ip}\n" for h, ip in DNS_HOSTS.items())
                        + "local=/probewire.test/\nno-resolv\nno-hosts\n")
        argv = ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}",
                f"--listen-address={listen}", "--bind-interfaces", f"--port={port}",
                "--user=root", f"--pid-file={tmp / 'pid'}", "--cache-size=0"]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            if proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited with {proc.returncode}")
            yield DbServer(port, proc, tmp, listen)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def resolver_netns(nameserver: str) -> Iterator[str]:
    """A network namespace (loopback up) whose resolv.conf names `nameserver`: `ip netns
    exec` bind-mounts /etc/netns/<name>/resolv.conf over /etc/resolv.conf for what it runs."""
    name = f"pw-{os.getpid()}-{rnd_tag()}-d"
    etc = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:2\n")
        yield name
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        subprocess.run(["ip", "netns", "delete", name], timeout=10, check=False)


def rnd_tag() -> str:
    return os.urandom(3).hex()


def dns_lookups(rnd: random.Random, n: int) -> list[tuple[str, str, str]]:
    """(tool, name, type) lookups with random names, existing and not."""
    out = []
    for _ in range(n):
        name = rnd.choice([*DNS_HOSTS, "missing.probewire.test", f"n{rnd.randrange(99)}."
                           "probewire.test"])
        out.append((rnd.choice(["dig", "getent", "getent-hosts", "getaddrinfo"]), name,
                    rnd.choice(["A", "AAAA", "TXT"])))
    return out


def dns_truth_of(name: str, qtype: str) -> tuple[str, str, str, str]:
    status = "" if name in DNS_HOSTS else "NXDOMAIN"
    return ("dns", qtype, name, status)


def dns_unanswered(netns: str, name: str) -> Truth:
    """dig asking a server in `netns` (127.0.0.9:53) that reads queries and never answers."""
    code = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.bind(('127.0.0.9', 53))\nprint('ready', flush=True)\n"
            "while True: s.recv(512)\n")
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", netns, "dig", "@127.0.0.9", "+tries=1",
                        "+time=1", "+noedns", name, "A"], capture_output=True, timeout=20,
                       check=False)
    finally:
        server.kill()
        server.wait()
    return Counter({("dns", "A", name, "TIMEOUT"): 1})


def dns_driver(netns: str, server: str, port: int, rnd: random.Random, n: int) -> Truth:
    """dig (one query of the drawn type), `getent ahosts`, `getent hosts` and Python's
    socket.getaddrinfo
    (glibc: an A and an AAAA query, sent together with sendmmsg), run inside `netns` whose
    resolv.conf names the server (for dig, @server -p port)."""
    truth: Truth = Counter()
    for tool, name, qtype in dns_lookups(rnd, n):
        if tool == "dig":
            subprocess.run(["ip", "netns", "exec", netns, "dig", f"@{server}", "-p", str(port),
                            "+tries=1", "+time=2", "+noedns", name, qtype],
                           capture_output=True, timeout=20, check=False)
            truth[dns_truth_of(name, qtype)] += 1
        else:
            # getent hosts asks AAAA then A (both always: no name here has an AAAA record)
            argv = (["getent", "ahosts", name] if tool == "getent" else
                    ["getent", "hosts", name] if tool == "getent-hosts" else
                    ["python3", "-c", "import socket,sys\ntry: socket.getaddrinfo(sys.argv[1],"
                     " 80, proto=socket.IPPROTO_TCP)\nexcept OSError: pass", name])
            subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                           timeout=20, check=False)
            truth[dns_truth_of(name, "A")] += 1
            truth[dns_truth_of(name, "AAAA")] += 1
    return truth
