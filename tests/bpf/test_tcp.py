"""tcp probe against real loopback sockets: exact counts of connections, bytes, resets, RTT.

Needs: tp_btf (or tp) tracepoints sock/inet_sock_set_state, tcp/tcp_{send,receive}_reset.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
from agentlib import free_port, passive_resets_traced, scrape, total, wait_for

pytestmark = pytest.mark.bpf

SERVICE = "pytest"  # this process runs as `python -m pytest`


def _serve(listener: socket.socket, n: int, reply: bytes, server_closes_first: bool) -> None:
    for _ in range(n):
        conn, _ = listener.accept()
        with conn:
            got = 0
            while got < REQUEST_BYTES:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += len(chunk)
            conn.sendall(reply)
            if not server_closes_first:
                conn.recv(1)  # wait for the client's FIN


REQUEST_BYTES = 100_000
REPLY = b"r" * 7_777


def _client(port: int, server_closes_first: bool) -> None:
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"q" * REQUEST_BYTES)
        got = b""
        while len(got) < len(REPLY):
            chunk = c.recv(65536)
            if not chunk:
                break
            got += chunk
        assert got == REPLY
        if server_closes_first:
            assert c.recv(1) == b""


def _run_connections(port: int, n: int, server_closes_first: bool) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    server = threading.Thread(target=_serve, args=(listener, n, REPLY, server_closes_first))
    server.start()
    try:
        for _ in range(n):
            _client(port, server_closes_first)
    finally:
        server.join(timeout=30)
        listener.close()


@pytest.mark.parametrize(
    "server_closes_first", [False, True], ids=["client-closes", "server-closes"]
)
def test_loopback_connections_counted_exactly_with_bytes(agent, server_closes_first: bool) -> None:
    _, listen = agent
    port = free_port()
    n = 25
    _run_connections(port, n, server_closes_first)
    p = str(port)

    def closed() -> float:
        return total(scrape(listen), "probewire_tcp_connections_closed_total", server_port=p)

    wait_for(lambda: closed() >= 2 * n)
    s = scrape(listen)
    client = {"server_port": p, "direction": "client", "service_name": SERVICE}
    server = {"server_port": p, "direction": "server", "service_name": SERVICE}
    assert total(s, "probewire_tcp_connections_opened_total", **client) == n
    assert total(s, "probewire_tcp_connections_opened_total", **server) == n
    assert total(s, "probewire_tcp_connections_closed_total", **client) == n
    assert total(s, "probewire_tcp_connections_closed_total", **server) == n
    assert total(s, "probewire_tcp_bytes_sent_total", **client) == n * REQUEST_BYTES
    assert total(s, "probewire_tcp_bytes_received_total", **client) == n * len(REPLY)
    assert total(s, "probewire_tcp_bytes_sent_total", **server) == n * len(REPLY)
    assert total(s, "probewire_tcp_bytes_received_total", **server) == n * REQUEST_BYTES
    assert total(s, "probewire_tcp_connections_failed_total", server_port=p) == 0
    assert total(s, "probewire_tcp_resets_total", server_port=p) == 0
    # The client side names the server it called; the server side has no peer label.
    assert total(s, "probewire_tcp_connections_opened_total", server_address="127.0.0.1",
                 server_port=p) == n


def test_rtt_histogram_counts_every_closed_connection_and_loopback_is_fast(agent) -> None:
    _, listen = agent
    port = free_port()
    n = 10
    _run_connections(port, n, server_closes_first=False)
    p = str(port)
    wait_for(lambda: total(scrape(listen), "probewire_tcp_rtt_seconds_count", server_port=p)
             >= 2 * n)
    s = scrape(listen)
    assert total(s, "probewire_tcp_rtt_seconds_count", server_port=p, direction="client") == n
    assert total(s, "probewire_tcp_rtt_seconds_count", server_port=p, direction="server") == n
    # Loopback RTT is tens of microseconds: every sample sits at or below 1.024 ms.
    assert total(s, "probewire_tcp_rtt_seconds_bucket", server_port=p, le="0.001024") == 2 * n
    assert total(s, "probewire_tcp_connection_duration_seconds_count", server_port=p) == 2 * n


def test_connect_to_closed_port_counts_reset_and_failure(agent) -> None:
    _, listen = agent
    port = free_port()  # bound then closed: nothing listens
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError), socket.socket() as c:
            c.connect(("127.0.0.1", port))
    p = str(port)
    wait_for(lambda: total(scrape(listen), "probewire_tcp_connections_failed_total",
                           server_port=p) >= 3)
    s = scrape(listen)
    assert total(s, "probewire_tcp_resets_total", server_port=p, direction="client",
                 reset="received", service_name=SERVICE) == 3
    assert total(s, "probewire_tcp_resets_total", server_port=p, direction="server",
                 reset="sent") == (3 if passive_resets_traced() else 0)
    assert total(s, "probewire_tcp_connections_failed_total", server_port=p,
                 direction="client") == 3
    assert total(s, "probewire_tcp_connections_opened_total", server_port=p) == 0


def test_listener_opened_before_agent_is_attributed_to_its_process() -> None:
    """Listeners that predate the agent are found in /proc and seeded into the kernel map."""
    from agentlib import running_agent

    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    with running_agent() as (_, listen):
        t = threading.Thread(target=_serve, args=(listener, 2, REPLY, False))
        t.start()
        for _ in range(2):
            _client(port, server_closes_first=False)
        t.join(timeout=30)
        p = str(port)
        wait_for(lambda: total(scrape(listen), "probewire_tcp_connections_closed_total",
                               server_port=p, direction="server") >= 2)
        s = scrape(listen)
        assert total(s, "probewire_tcp_connections_opened_total", server_port=p,
                     direction="server", service_name=SERVICE) == 2
    listener.close()


def test_port_filter_is_applied_in_kernel_while_running(agent) -> None:
    """Only the traced port counts. Totals are deltas of this process's connections: the
    session's earlier tests and other processes on the host may have used either port number
    (a free_port() is free now, not unused), so the filter also holds this process's pid."""
    a, listen = agent
    traced, ignored = free_port(), free_port()
    assert a.filter is not None
    a.filter.apply(ports=[traced], pids=[os.getpid()])
    try:
        s = scrape(listen)
        closed_before = total(s, "probewire_tcp_connections_closed_total",
                              server_port=str(traced))
        ignored_before = total(s, "probewire_tcp_connections_opened_total",
                               server_port=str(ignored))
        _run_connections(traced, 3, server_closes_first=False)
        _run_connections(ignored, 3, server_closes_first=False)
        wait_for(lambda: total(scrape(listen), "probewire_tcp_connections_closed_total",
                               server_port=str(traced)) - closed_before >= 6)
        s = scrape(listen)
    finally:
        a.filter.apply()
    assert total(s, "probewire_tcp_connections_closed_total",
                 server_port=str(traced)) - closed_before == 6
    assert total(s, "probewire_tcp_connections_opened_total",
                 server_port=str(ignored)) - ignored_before == 0
