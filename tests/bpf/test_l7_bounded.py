"""The l7 family's bounded-loop object (bpf/l7/bounded.h, loaded where the kernel lacks bpf_loop,
task storage, bpf_task_pt_regs or bpf_get_current_task_btf: Debian 5.10 in the kernel matrix)
forced on this kernel: the feature probe's answers are replaced, so the agent loads
l7_bounded with its sys_enter argument hooks, and the HTTP/1.x tests of test_http.py run
against it unchanged (exact counts per route and status on both sides of nginx and its
upstream, sendfile bodies, chunked ends, pipelining, a thousand keep-alive requests).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator

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
from probewire.runtime.features import L7_OPTIONAL, HookSupport
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
    """l7_bounded walks at most L7_BOUNDED_PIECES (32) pieces of a call for a user-space
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
