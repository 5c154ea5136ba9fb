"""HTTP/2 (TLS, through the OpenSSL uprobes) and gRPC (h2c, through syscalls), end to end.

Needs: uprobes on libssl.so.3, tp/ syscall tracepoints, ring buffers, tail calls.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator

import grpc
import h2.config
import h2.connection
import pytest
from agentlib import running_agent, scrape, total, wait_for
from test_http import CLIENT, SERVER, Delta

from support.servers import nginx, python_script_server, python_upstream

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]

GRPC_SERVER = """
import sys, grpc
from concurrent import futures

def ping(req, ctx):
    if req == b"fail":
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b"pong:" + req

def listing(req, ctx):
    for i in range(5):
        yield b"item%d" % i

handler = grpc.method_handlers_generic_handler("demo.Echo", {
    "Ping": grpc.unary_unary_rpc_method_handler(ping),
    "List": grpc.unary_stream_rpc_method_handler(listing),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[int]:
    with python_script_server("echo_server", GRPC_SERVER) as server:
        yield server.port


@pytest.fixture(scope="module")
def h2_nginx() -> Iterator[int]:
    with python_upstream() as up, nginx(upstream_port=up.port, tls=True) as ng:
        yield ng.port


def curl_h2(port: int, path: str) -> str:
    out = subprocess.run(["curl", "-sk", "--http2", "-o", "/dev/null", "-w",
                          "%{http_code} %{http_version}", f"https://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=10)
    return out.stdout


def test_curl_http2_over_tls_counted_per_route_and_status_on_both_sides(agent, h2_nginx) -> None:
    _, listen = agent
    d = Delta(listen)
    for _ in range(3):
        assert curl_h2(h2_nginx, "/static/index.html") == "200 2"
    assert curl_h2(h2_nginx, "/missing") == "404 2"
    assert curl_h2(h2_nginx, "/boom") == "500 2"
    d.settle(SERVER, 5, service_name="nginx", url_scheme="https")
    s = {"service_name": "nginx", "url_scheme": "https"}
    assert d(SERVER, http_route="/static/index.html", http_response_status_code="200",
             http_request_method="GET", **s) == 3
    assert d(SERVER, http_route="/missing", http_response_status_code="404", **s) == 1
    assert d(SERVER, http_route="/boom", http_response_status_code="500", **s) == 1
    assert d(SERVER, **s) == 5
    c = {"service_name": "curl", "server_port": str(h2_nginx), "url_scheme": "https"}
    assert d(CLIENT, http_route="/static/index.html", http_response_status_code="200", **c) == 3
    assert d(CLIENT, **c) == 5
    assert d("probewire_http2_connections_lost_total") == 0


def test_grpc_unary_and_streaming_counted_per_method_and_status(agent, grpc_server) -> None:
    _, listen = agent
    d = Delta(listen)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_server}") as channel:
        ping = channel.unary_unary("/demo.Echo/Ping")
        listing = channel.unary_stream("/demo.Echo/List")
        for _ in range(4):
            assert ping(b"x") == b"pong:x"
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                ping(b"fail")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(list(listing(b"y"))) == 5
    server = "rpc_server_duration_seconds_count"
    client = "rpc_client_duration_seconds_count"
    d.settle(server, 7, rpc_service="demo.Echo")
    d.settle(client, 7, rpc_service="demo.Echo")
    base = {"rpc_system": "grpc", "rpc_service": "demo.Echo"}
    srv = {"service_name": "echo_server", **base}
    assert d(server, rpc_method="Ping", rpc_grpc_status_code="0", **srv) == 4
    assert d(server, rpc_method="Ping", rpc_grpc_status_code="5", **srv) == 2
    assert d(server, rpc_method="List", rpc_grpc_status_code="0", **srv) == 1
    assert d(server, **srv) == 7
    cli = {"service_name": "pytest", **base}
    assert d(client, rpc_method="Ping", rpc_grpc_status_code="0", **cli) == 4
    assert d(client, rpc_method="Ping", rpc_grpc_status_code="5", **cli) == 2
    assert d(client, rpc_method="List", rpc_grpc_status_code="0", **cli) == 1
    # gRPC is not double-counted as plain HTTP.
    assert d(SERVER, service_name="echo_server") == 0
    assert d("probewire_http2_connections_lost_total") == 0


def h2_tls_client(port: int) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    ctx = ssl._create_unverified_context()
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def h2_get(sock: ssl.SSLSocket, conn: h2.connection.H2Connection, path: str) -> int:
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "GET"), (":path", path), (":scheme", "https"),
                            (":authority", "127.0.0.1")], end_stream=True)
    sock.sendall(conn.data_to_send())
    status = 0
    while True:
        data = sock.recv(65536)
        assert data, "server closed"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            if isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
                return status
        out = conn.data_to_send()
        if out:
            sock.sendall(out)


def test_connections_opened_before_the_agent_are_counted_as_such_never_guessed(
    h2_nginx, grpc_server
) -> None:
    import h2.events  # noqa: F401  (used by h2_get)

    sock, conn = h2_tls_client(h2_nginx)
    assert h2_get(sock, conn, "/static/index.html") == 200
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_server}")
    ping = channel.unary_unary("/demo.Echo/Ping")
    assert ping(b"early") == b"pong:early"
    try:
        with running_agent() as (_, listen):
            for _ in range(3):
                assert h2_get(sock, conn, "/static/index.html") == 200
                assert ping(b"late") == b"pong:late"
            wait_for(lambda: total(scrape(listen), "probewire_http_unrecognized_connections_total",
                                   transport="tls") >= 2)
            s = scrape(listen)
            # The TLS connection's plaintext is seen from the middle: counted, not parsed
            # (both ends: this client and nginx).
            assert total(s, "probewire_http_unrecognized_connections_total", transport="tls") >= 2
            assert total(s, SERVER, service_name="nginx") == 0
            assert total(s, CLIENT, server_port=str(h2_nginx)) == 0
            # The h2c gRPC channel from before: no series, and no wrong ones.
            assert total(s, "rpc_server_duration_seconds_count") == 0
            assert total(s, "rpc_client_duration_seconds_count") == 0
    finally:
        channel.close()
        sock.close()


def test_the_bytes_ring_has_its_own_size() -> None:
    """ring.data_size_bytes sizes the L7 bytes ring (one lost record gives an HTTP/2
    connection up), ring.size_bytes the record rings."""
    with running_agent({"ring": {"size_bytes": 1 << 20, "data_size_bytes": 1 << 23}}) as (
            agent, _):
        maps = agent.running["l7"].obj.maps
        assert maps["l7_data"].max_entries == 1 << 23
        assert maps["events"].max_entries == 1 << 20
