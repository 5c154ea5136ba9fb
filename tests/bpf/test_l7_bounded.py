"""The l7 family's bounded-loop object (bpf/l7/bounded.h, loaded where the kernel lacks bpf_loop,
task storage, bpf_task_pt_regs or bpf_get_current_task_btf: Debian 5.10 in the kernel matrix)
forced on this kernel: the feature probe's answers are replaced, so the agent loads
l7_bounded with its sys_enter argument hooks, and the HTTP/1.x tests of test_http.py run
against it unchanged (exact counts per route and status on both sides of nginx and its
upstream, sendfile bodies, chunked ends, pipelining, a thousand keep-alive requests). A call
whose sys_enter the agent never saw (a recv() already blocked when it attached) is counted in
probewire_l7_missed_calls, on this object only.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from agentlib import running_agent, scrape, total, wait_for

# Collected here again, with this module's `agent`: the same assertions on the bounded object.
from test_http import (  # noqa: F401
    stack,
    test_chunked_megabyte_response_is_one_request,
    test_chunked_response_counted_at_its_last_chunk_while_the_connection_idles,
    test_last_chunk_in_a_gathered_write_ends_the_exchange_while_the_connection_idles,
    test_nginx_and_upstream_counted_exactly_per_route_and_status_on_both_sides,
    test_pipelined_requests_are_each_counted_with_their_own_route,
    test_request_line_split_across_reads_is_parsed_whole,
    test_sendfile_response_body_is_measured_exactly,
    test_thousand_requests_on_one_keepalive_connection,
)

from probewire.agent import Agent
from probewire.probes import l7
from probewire.runtime.features import L7_OPTIONAL, HookSupport, probe_kernel_features
from support.dbservers import redis_server

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]


def lacking(names: Iterable[str] | None = None) -> dict[str, HookSupport]:
    return {n: HookSupport(n, False, "the kernel refuses it")
            for n in (names if names is not None else L7_OPTIONAL)}


@pytest.fixture(scope="module")
def agent() -> Iterator[tuple[Agent, str]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(l7, "probe_kernel_features", lacking)
        with running_agent() as pair:
            yield pair


def test_the_bounded_object_runs_with_its_enter_hooks_named_in_status(agent) -> None:
    a, _ = agent
    assert "l7" in a.running and "l7" not in a.disabled
    assert a.probes["l7"].object_name == l7.BOUNDED_OBJECT
    rows = [s for s in a.status() if s.probe == "l7"]
    hooks = {s.hook for s in rows}
    assert {f"sys_enter_{name}" for name in l7.SYSCALLS} <= hooks
    assert {f"sys_exit_{name}" for name in l7.SYSCALLS} <= hooks
    for s in rows:
        assert s.attached, s
        assert "bounded-loop variant l7_bounded (this kernel lacks bpf_loop (5.17+) and " \
               "task_storage (5.11+) and task_pt_regs (5.15+) and current_task_btf (5.11+))" \
               in s.fallback_reason, s


def test_doctor_names_the_bounded_object_and_its_stand_ins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """doctor's l7 row says the bounded-loop object runs and which features it stands in for
    (on 5.10 for real; here the probe's answers are replaced)."""
    from probewire import doctor

    monkeypatch.setattr(l7, "probe_kernel_features", lacking)
    rows = {name: (ok, detail) for name, ok, detail in doctor._family_rows("127.0.0.1:1")}
    ok, detail = rows["family l7"]
    assert ok, detail
    assert detail.startswith("on (loaded just now): tp"), detail
    assert "; bounded-loop variant l7_bounded (this kernel lacks bpf_loop (5.17+) and " \
           "task_storage (5.11+) and task_pt_regs (5.15+) and current_task_btf (5.11+))" \
           in detail, detail


def test_a_call_with_more_pieces_than_the_bounded_walk_takes_is_counted_truncated(
        agent) -> None:
    """l7_bounded walks at most L7_BOUNDED_PIECES (48) pieces of a call for a user-space
    parser (bpf_loop's walk: 256): a redis command written as 60 one-byte iovecs (a piece for
    each iovec change and one for its byte) ships what the walk took and is counted in
    probewire_l7_truncated_calls, never silently lost."""
    _, listen = agent
    value = b"v" * 30
    command = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$30\r\n" + value + b"\r\n"
    before = total(scrape(listen), "probewire_l7_truncated_calls_total", protocol="redis")
    with redis_server() as srv, socket.create_connection(("127.0.0.1", srv.port)) as c:
        c.sendall(b"*1\r\n$4\r\nPING\r\n")  # classifies the connection
        assert c.recv(64) == b"+PONG\r\n"
        pieces = [command[:24], *(bytes([b]) for b in command[24:])]
        assert len(pieces) > 32
        assert c.sendmsg(pieces) == len(command)
        assert c.recv(64) == b"+OK\r\n"
        wait_for(lambda: total(scrape(listen), "probewire_l7_truncated_calls_total",
                               protocol="redis") >= before + 1)
    after = total(scrape(listen), "probewire_l7_truncated_calls_total", protocol="redis")
    assert after - before == 1


# recvfrom's number (/proc/<pid>/syscall), where Python's socket.recv() blocks.
RECVFROM_NR = {"x86_64": 45, "aarch64": 207}

# A redis-speaking server of the test's own: it accepts one connection, then answers two
# commands, printing the byte count of each recv() on stdout (a pipe: no socket call).
RECEIVER = """
import socket
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
print(conn.fileno(), flush=True)
for reply in (b"+OK\\r\\n", b"+PONG\\r\\n"):
    print(len(conn.recv(1 << 16)), flush=True)
    conn.sendall(reply)
conn.recv(1)  # until the test closes its end
"""


def blocked_in_recvfrom(pid: int, fd: int) -> bool:
    """The process sits in recvfrom(fd, ...): its call began before whatever attaches now. On
    an architecture whose number RECVFROM_NR does not list: in a blocking call on that fd (the
    receiver makes no other)."""
    fields = Path(f"/proc/{pid}/syscall").read_text().split()
    if len(fields) < 2 or fields[0] == "running":
        return False
    number = RECVFROM_NR.get(os.uname().machine)
    return (number is None or fields[0] == str(number)) and int(fields[1], 16) == fd


@pytest.mark.parametrize("variant", ["bounded", "native"])
def test_a_recv_blocked_before_the_agent_attached_is_counted_missed_once(
        monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    """A process of the test's own blocks in recv() on a loopback TCP connection before the
    agent starts; then a redis SET of a random size arrives, then a PING. On l7_bounded the
    SET's recv() had no sys_enter the agent saw: it counts once in
    probewire_l7_missed_calls{reason="no_sys_enter"}, and the PING (entered after the attach)
    is captured and parsed as one redis exchange. On the host object the exit reads the
    arguments from the saved registers: both exchanges are parsed and the counter stays 0.
    `bounded` forces l7_bounded; `native` loads what this kernel picks (the host object here,
    l7_bounded on Debian 5.10). Exact despite foreign traffic: the agent's pid filter is the
    receiver alone, and the counter is the agent's own map (other agents load their own)."""
    if variant == "bounded":
        monkeypatch.setattr(l7, "probe_kernel_features", lacking)
        bounded = True
    else:
        # The real answers (this module's `agent` fixture replaces them while it lives).
        monkeypatch.setattr(l7, "probe_kernel_features", probe_kernel_features)
        bounded = not all(f.available for f in probe_kernel_features(L7_OPTIONAL).values())
    missed, exchanges = (1, 1) if bounded else (0, 2)
    value = random.randbytes(random.randint(1, 3000))
    command = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n" % (len(value), value)
    child = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    try:
        port = int(child.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as c:
            fd = int(child.stdout.readline())
            assert wait_for(lambda: blocked_in_recvfrom(child.pid, fd)), \
                Path(f"/proc/{child.pid}/syscall").read_text()
            with running_agent({"filter": {"pids": [child.pid]}}) as (a, listen):
                expected_object = l7.BOUNDED_OBJECT if bounded else "l7"
                assert a.probes["l7"].object_name == expected_object
                assert blocked_in_recvfrom(child.pid, fd)  # still in the call it began before
                c.sendall(command)
                assert int(child.stdout.readline()) == len(command)
                assert c.recv(64) == b"+OK\r\n"
                c.sendall(b"*1\r\n$4\r\nPING\r\n")
                assert int(child.stdout.readline()) == 14
                assert c.recv(64) == b"+PONG\r\n"
                wait_for(lambda: total(scrape(listen), "probewire_l7_exchanges_total",
                                       protocol="redis") >= exchanges)
                s = scrape(listen)
                key = ("probewire_l7_missed_calls_total", (("reason", "no_sys_enter"),))
                assert s.get(key) == missed, (len(command), s.get(key))
                assert total(s, "probewire_l7_exchanges_total", protocol="redis") \
                    == exchanges, len(command)
                assert total(s, "probewire_l7_connections_total", protocol="redis") == 1
                assert a.coverage()["l7"]["missed_calls"] == {"no_sys_enter": missed}
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("seed", [11, 12])
def test_memcached_sets_larger_than_the_bounded_walk_are_counted_exactly(
        monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """pymemcache writes a set as one buffer: values of up to 1 MB are calls of up to 128
    records; memcached answers a multi-key get in one sendmsg of an iovec per line and value.
    l7_bounded passes over a call's middle sooner than bpf_loop's walk (after 24 records, not
    32), so the skip and the last bytes still fit in its 48 pieces: every set and get
    completes. On Debian 5.10 the client side lost sets over 256 KiB (its walk of 32 pieces ran
    out before the tail). Both sides exact: the agent traces this server's port only."""
    from pymemcache.client.base import Client
    from test_l7_databases import exact_on_both_sides

    from support import dbservers as db

    monkeypatch.setattr(l7, "probe_kernel_features", lacking)
    rnd = random.Random(seed)
    with db.memcached_server() as srv, \
            running_agent({"filter": {"ports": [srv.port]}}) as (a, listen):
        assert a.probes["l7"].object_name == l7.BOUNDED_OBJECT
        truth = db.memcached_driver(srv.port, rnd, rnd.randint(20, 60))
        # At least one set past the bounded walk's 192 KiB, whatever the seed drew.
        big = Client(("127.0.0.1", srv.port))
        try:
            big.set("over", b"o" * rnd.randint(196_609, 1_000_000))
        finally:
            big.close()
        truth["memcached", "SET", "", ""] += 1
        exact_on_both_sides(listen, "memcached", srv.port, truth)
