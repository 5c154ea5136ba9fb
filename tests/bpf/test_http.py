"""http probe against real servers and clients: nginx (static files by sendfile, return 404/500,
proxy_pass) in front of a Python upstream; curl and http.client as clients. Exact counts per
(service, method, route, status) on both sides, latency buckets, and the awkward cases.

Needs: tp/ syscall tracepoints (read/write/readv/writev/recvfrom/sendto/recvmsg/sendmsg/
sendfile64/close), ring buffers, tail calls.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from agentlib import Samples, scrape, total, wait_for

from probewire.probes.l7 import L7Probe
from support.servers import nginx, python_upstream

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]

SERVER = "http_server_request_duration_seconds_count"
CLIENT = "http_client_request_duration_seconds_count"


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[int, int]]:
    """(nginx port, upstream port): nginx proxies /api/ to the Python upstream."""
    with python_upstream() as up, nginx(upstream_port=up.port) as ng:
        yield ng.port, up.port


class Delta:
    """Counts since construction, so tests sharing the session agent stay independent."""

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.before: Samples = scrape(listen)
        self.after: Samples = self.before

    def refresh(self) -> Delta:
        self.after = scrape(self.listen)
        return self

    def __call__(self, name: str, **labels: str) -> float:
        return total(self.after, name, **labels) - total(self.before, name, **labels)

    def settle(self, name: str, expected: float, **labels: str) -> Delta:
        wait_for(lambda: self.refresh()(name, **labels) >= expected)
        time.sleep(0.1)  # anything extra would show up now, and fail the exact assertions
        return self.refresh()


def server(d: Delta, service: str, method: str, route: str, status: int) -> float:
    return d(SERVER, service_name=service, http_request_method=method, http_route=route,
             http_response_status_code=str(status))


def get_many(port: int, requests: list[tuple[str, str]]) -> list[int]:
    """Requests over one keep-alive connection (http.client), returning the statuses."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses = []
    for method, path in requests:
        conn.request(method, path)
        resp = conn.getresponse()
        resp.read()
        statuses.append(resp.status)
    conn.close()
    return statuses


def test_nginx_and_upstream_counted_exactly_per_route_and_status_on_both_sides(
    agent, stack
) -> None:
    _, listen = agent
    ng, up = stack
    d = Delta(listen)
    reqs = (
        [("GET", "/static/index.html")] * 5
        + [("HEAD", "/static/index.html")] * 2
        + [("GET", "/missing")] * 3
        + [("GET", "/boom")] * 2
        + [("GET", f"/api/items/{i}?q=secret") for i in range(4)]
        + [("GET", "/api/fail")]
    )
    statuses = get_many(ng, reqs)
    assert statuses == [200] * 7 + [404] * 3 + [500] * 2 + [200] * 4 + [503]
    for _ in range(2):
        subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{ng}/static/index.html"],
                       check=True, timeout=10)
    d.settle(SERVER, 19 + 5, service_name="nginx")
    d.settle(SERVER, 5, service_name="upstream")

    assert server(d, "nginx", "GET", "/static/index.html", 200) == 7
    assert server(d, "nginx", "HEAD", "/static/index.html", 200) == 2
    assert server(d, "nginx", "GET", "/missing", 404) == 3
    assert server(d, "nginx", "GET", "/boom", 500) == 2
    assert server(d, "nginx", "GET", "/api/items/{id}", 200) == 4
    assert server(d, "nginx", "GET", "/api/fail", 503) == 1
    assert d(SERVER, service_name="nginx") == 19
    assert server(d, "upstream", "GET", "/api/items/{id}", 200) == 4
    assert server(d, "upstream", "GET", "/api/fail", 503) == 1
    assert d(SERVER, service_name="upstream") == 5
    # Client side: this test process, curl, and nginx calling its upstream.
    assert d(CLIENT, service_name="pytest", server_port=str(ng)) == 17
    assert d(CLIENT, service_name="pytest", server_port=str(ng), http_route="/boom",
             http_response_status_code="500") == 2
    assert d(CLIENT, service_name="curl", server_port=str(ng), http_request_method="GET",
             http_route="/static/index.html", http_response_status_code="200") == 2
    assert d(CLIENT, service_name="nginx", server_port=str(up), server_address="127.0.0.1",
             http_route="/api/items/{id}", http_response_status_code="200") == 4
    assert d(CLIENT, service_name="nginx", server_port=str(up), http_route="/api/fail",
             http_response_status_code="503") == 1
    # No query string ever reaches a label.
    assert not any("secret" in v for (_, labels) in d.after for _, v in labels)
    # Service graph: the nginx -> upstream edge, with the 503 as its one failure.
    assert d("traces_service_graph_request_total", client="nginx", server="upstream") == 5
    assert d("traces_service_graph_request_failed_total", client="nginx", server="upstream") == 1
    assert d("traces_service_graph_request_total", client="pytest", server="nginx") == 17
    assert d("traces_service_graph_request_server_seconds_count", client="nginx",
             server="upstream") == 5


def test_response_counted_at_its_last_byte_while_the_keepalive_connection_idles(
    agent, stack
) -> None:
    """nginx reads a keep-alive connection only when the next request is there: the kernel
    counts each response when the last of its Content-Length bytes is written."""
    _, listen = agent
    ng, _ = stack
    d = Delta(listen)
    conn = http.client.HTTPConnection("127.0.0.1", ng, timeout=30)
    try:
        for method, path in (("GET", "/static/index.html"), ("GET", "/static/big.bin"),
                             ("GET", "/missing"), ("HEAD", "/static/index.html")):
            conn.request(method, path)
            conn.getresponse().read()
        d.settle(SERVER, 4, service_name="nginx")  # the connection is open and idle
        assert d(SERVER, service_name="nginx") == 4
        assert server(d, "nginx", "GET", "/static/big.bin", 200) == 1
        assert server(d, "nginx", "GET", "/missing", 404) == 1
        assert server(d, "nginx", "HEAD", "/static/index.html", 200) == 1
        assert d("http_server_response_body_size_bytes_sum", service_name="nginx",
                 http_route="/static/big.bin") == 1 << 20
    finally:
        conn.close()


def test_sendfile_response_body_is_measured_exactly(agent, stack) -> None:
    _, listen = agent
    ng, _ = stack
    d = Delta(listen)
    assert get_many(ng, [("GET", "/static/big.bin")] * 3) == [200] * 3
    d.settle(SERVER, 3, service_name="nginx", http_route="/static/big.bin")
    labels = {"service_name": "nginx", "http_route": "/static/big.bin"}
    assert d("http_server_response_body_size_bytes_sum", **labels) == 3 * (1 << 20)
    assert d("http_server_response_body_size_bytes_count", **labels) == 3
    assert d("http_server_request_body_size_bytes_sum", **labels) == 0


def test_latency_lands_in_the_right_buckets(agent, stack) -> None:
    _, listen = agent
    _, up = stack
    d = Delta(listen)
    get_many(up, [("GET", "/api/slow")] * 3 + [("GET", "/api/fast/1")] * 5)
    d.settle(SERVER, 8, service_name="upstream")
    slow = {"service_name": "upstream", "http_route": "/api/slow"}
    fast = {"service_name": "upstream", "http_route": "/api/fast/{id}"}
    bucket = "http_server_request_duration_seconds_bucket"
    # The sleep bounds the slow route from below, whatever the machine's load: none of its
    # samples may sit in a bucket under 100 ms. The fast one answers in well under 100 ms.
    assert d(bucket, le="0.075", **slow) == 0
    assert d(bucket, le="+Inf", **slow) == 3
    assert d("http_server_request_duration_seconds_sum", **slow) >= 0.3
    assert d(bucket, le="0.1", **fast) == 5
    # The client saw the same 100 ms.
    assert d("http_client_request_duration_seconds_bucket", le="0.075", service_name="pytest",
             server_port=str(up), http_route="/api/slow") == 0


def raw_exchange(port: int, chunks: list[bytes], pause_s: float = 0.05,
                 read_until: bytes | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for chunk in chunks:
            s.sendall(chunk)
            time.sleep(pause_s)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while read_until is None or data.count(b"HTTP/1.1 ") < read_until.count(b"x"):
            part = s.recv(65536)
            if not part:
                break
            data += part
        return data


def req(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


@pytest.mark.parametrize("target", ["nginx", "upstream"])
def test_pipelined_requests_are_each_counted_with_their_own_route(agent, stack, target) -> None:
    _, listen = agent
    ng, up = stack
    port = ng if target == "nginx" else up
    d = Delta(listen)
    paths = ["/api/p/1", "/api/p/2", "/api/fail"] if target == "upstream" else [
        "/static/index.html", "/missing", "/boom"]
    reply = raw_exchange(port, [b"".join(req(p) for p in paths)])
    assert reply.count(b"HTTP/1.1 ") == 3
    d.settle(SERVER, 3, service_name=target)
    if target == "upstream":
        assert server(d, "upstream", "GET", "/api/p/{id}", 200) == 2
        assert server(d, "upstream", "GET", "/api/fail", 503) == 1
    else:
        assert server(d, "nginx", "GET", "/static/index.html", 200) == 1
        assert server(d, "nginx", "GET", "/missing", 404) == 1
        assert server(d, "nginx", "GET", "/boom", 500) == 1
    assert d(SERVER, service_name=target) == 3


def test_request_line_split_across_reads_is_parsed_whole(agent, stack) -> None:
    _, listen = agent
    _, up = stack
    d = Delta(listen)
    raw_exchange(up, [b"GE", b"T /api/split/1 HTTP/1.1\r\nHost: t\r\n\r\n"])
    raw_exchange(up, [b"GET /api/spl", b"it/2 HTTP/1.1\r\nHost: t\r\n\r\n"])
    d.settle(SERVER, 2, service_name="upstream")
    assert server(d, "upstream", "GET", "/api/split/{id}", 200) == 2
    assert d(SERVER, service_name="upstream") == 2


def test_chunked_megabyte_response_is_one_request(agent, stack) -> None:
    _, listen = agent
    ng, up = stack
    d = Delta(listen)
    assert get_many(up, [("GET", "/api/chunked")]) == [200]
    assert get_many(ng, [("GET", "/api/chunked")]) == [200]
    d.settle(SERVER, 2, service_name="upstream")
    assert server(d, "upstream", "GET", "/api/chunked", 200) == 2
    assert server(d, "nginx", "GET", "/api/chunked", 200) == 1
    sizes = d("http_server_response_body_size_bytes_sum", service_name="upstream",
              http_route="/api/chunked")
    assert sizes >= 2 * (1 << 20)


def test_chunked_response_counted_at_its_last_chunk_while_the_connection_idles(
    agent, stack
) -> None:
    """The Python upstream blocks reading the next request, nginx waits for one: only the
    last chunk written ("0" CRLF CRLF) tells the kernel these exchanges are over."""
    _, listen = agent
    ng, up = stack
    d = Delta(listen)
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for port in (up, ng)]
    try:
        for conn in conns:
            conn.request("GET", "/api/chunked")
            resp = conn.getresponse()
            assert resp.status == 200 and len(resp.read()) == 16 * 65536
        d.settle(SERVER, 2, service_name="upstream")
        d.settle(SERVER, 1, service_name="nginx")  # both connections are still open
        assert server(d, "upstream", "GET", "/api/chunked", 200) == 2
        assert server(d, "nginx", "GET", "/api/chunked", 200) == 1
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("chunks", [3, 20])
def test_last_chunk_in_a_gathered_write_ends_the_exchange_while_the_connection_idles(
    agent, chunks
) -> None:
    """A server that writes its whole chunked response in one sendmsg of many iovecs (12, and
    63 at 20 chunks, of the 64 looked at), the last chunk split over three of them (CRLF, "0"
    CRLF, CRLF): the exchange is counted at that write while the connection stays open."""
    import random
    import threading

    _, listen = agent
    rng = random.Random(chunks)
    body = [bytes([97 + i % 26]) * rng.randint(1, 3000) for i in range(chunks)]
    iovs = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for i, part in enumerate(body):
        iovs += [b"\r\n"] if i else []
        iovs += [f"{len(part):x}\r\n".encode(), part]
    iovs += [b"\r\n", b"0\r\n", b"\r\n"]
    srv = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            assert conn.sendmsg(iovs) == sum(map(len, iovs))
            done.wait(30)  # the connection stays open and idle while the test checks

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    d = Delta(listen)
    client = http.client.HTTPConnection("127.0.0.1", srv.getsockname()[1], timeout=30)
    try:
        client.request("GET", "/gathered")
        resp = client.getresponse()
        assert resp.status == 200 and resp.read() == b"".join(body)
        d.settle(SERVER, 1, service_name="pytest", http_route="/gathered")
        assert server(d, "pytest", "GET", "/gathered", 200) == 1
    finally:
        done.set()
        client.close()
        t.join(10)
        srv.close()


def test_thousand_requests_on_one_keepalive_connection(agent, stack) -> None:
    _, listen = agent
    ng, _ = stack
    d = Delta(listen)
    assert get_many(ng, [("GET", "/static/index.html")] * 1000) == [200] * 1000
    d.settle(SERVER, 1000, service_name="nginx")
    assert server(d, "nginx", "GET", "/static/index.html", 200) == 1000
    assert d(CLIENT, service_name="pytest", server_port=str(ng)) == 1000
    assert d("probewire_events_dropped_total", probe="l7") == 0


def test_client_gone_mid_response_and_connection_closed_mid_request(agent, stack) -> None:
    _, listen = agent
    ng, _ = stack
    d = Delta(listen)
    with socket.create_connection(("127.0.0.1", ng), timeout=10) as s:
        s.sendall(req("/static/big.bin"))
        assert s.recv(1000).startswith(b"HTTP/1.1 200")
    # Headers never finished: nginx sees EOF mid-request and closes without answering.
    with socket.create_connection(("127.0.0.1", ng), timeout=10) as s:
        s.sendall(b"GET /static/never HTTP/1.1\r\nHost: t\r\n")
        time.sleep(0.05)
    d.settle("probewire_http_aborted_total", 1, service_name="nginx", direction="server")
    d.settle(SERVER, 1, service_name="nginx", http_route="/static/big.bin")
    assert server(d, "nginx", "GET", "/static/big.bin", 200) == 1
    assert d("probewire_http_aborted_total", service_name="nginx", direction="server") == 1
    assert d(SERVER, service_name="nginx", http_route="/static/never") == 0


IMPATIENT = r'''
import os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /api/slow HTTP/1.1\r\nHost: t\r\n\r\n")
os._exit(0)  # no close(): the kernel closes the socket as the process goes
'''


def test_client_that_exits_before_its_answer_is_counted_as_aborted(agent, stack,
                                                                  tmp_path) -> None:
    """A process that dies with a request in flight never calls close(): the socket's last
    state change ends its exchange (aborted), as the server's answers on."""
    _, listen = agent
    _, up = stack
    script = tmp_path / "impatient.py"
    script.write_text(IMPATIENT)
    d = Delta(listen)
    for _ in range(3):
        subprocess.run([sys.executable, str(script), str(up)], check=True, timeout=30)
    d.settle("probewire_http_aborted_total", 3, service_name="impatient", direction="client")
    d.settle(SERVER, 3, service_name="upstream", http_route="/api/slow")
    assert d("probewire_http_aborted_total", service_name="impatient", direction="client") == 3
    assert d(CLIENT, service_name="impatient") == 0
    assert server(d, "upstream", "GET", "/api/slow", 200) == 3


def test_expect_100_continue_counts_the_final_response_only(agent, stack) -> None:
    _, listen = agent
    _, up = stack
    d = Delta(listen)
    body = b"x" * 5000
    with socket.create_connection(("127.0.0.1", up), timeout=10) as s:
        s.sendall(b"POST /api/upload HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 5000\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100")
        s.sendall(body)
        assert s.recv(1000).startswith(b"HTTP/1.1 201")
    d.settle(SERVER, 1, service_name="upstream")
    assert server(d, "upstream", "POST", "/api/upload", 201) == 1
    assert d(SERVER, service_name="upstream") == 1
    assert d("http_server_request_body_size_bytes_sum", service_name="upstream",
             http_route="/api/upload") == 5000


ECHO = """
import socket, sys
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    c, _ = s.accept()
    with c:
        while data := c.recv(65536):
            c.sendall(data)
"""


def test_garbage_and_other_protocols_never_become_http(agent, tmp_path) -> None:
    import random

    a, listen = agent
    script = tmp_path / "echo.py"
    script.write_text(ECHO)
    with socket.socket() as probe_sock:
        probe_sock.bind(("127.0.0.1", 0))
        port = probe_sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(script), str(port)])
    try:
        wait_for(lambda: subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                        text=True).stdout.strip() != "")
        rng = random.Random(1234)
        payloads = [b"*1\r\n$4\r\nPING\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                    b"SSH-2.0-OpenSSH_9.2\r\n", b"GET", b"HTTP/9.9 999 nope\r\n"]
        payloads += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
                     for _ in range(200)]
        for payload in payloads:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    got += s.recv(65536)
        time.sleep(0.3)
        s = scrape(listen)
        assert total(s, SERVER, service_name="echo") == 0
        assert total(s, CLIENT, server_port=str(port)) == 0
        # (l7_bounded, on kernels before 5.17, has its sys_enter hooks too)
        assert total(s, "probewire_probe_attached", probe="l7") == len(
            a.probes["l7"].active_hooks())
    finally:
        proc.kill()
        proc.wait()


def test_port_rule_names_the_server_and_label_budget_folds_overflow_into_other(stack) -> None:
    from agentlib import running_agent

    ng, _ = stack
    config = {
        "services": {"rules": [{"name": "edge-proxy", "port": ng}]},
        "probes": {"l7": {"max_series_per_metric": 10}},
    }
    with running_agent(config) as (_, listen):
        # 40 distinct routes (letters are never templated) against a budget of 10 series.
        paths = [("GET", f"/static/{chr(97 + i % 26)}{chr(97 + i // 26)}") for i in range(40)]
        statuses = get_many(ng, paths)
        assert statuses == [404] * 40
        wait_for(lambda: total(scrape(listen), SERVER, service_name="edge-proxy") >= 40)
        time.sleep(0.1)
        s = scrape(listen)
        assert total(s, SERVER, service_name="edge-proxy") == 40
        assert total(s, SERVER, service_name="nginx") == 0
        kept = {lbl: v for (n, lbl), v in s.items() if n == SERVER
                and ("service_name", "edge-proxy") in lbl and ("http_route", "other") not in lbl}
        assert len(kept) == 10 and set(kept.values()) == {1.0}
        assert total(s, SERVER, service_name="edge-proxy", http_route="other") == 30
        assert total(s, "probewire_cardinality_overflow_total",
                     metric="http_server_request_duration_seconds") > 0
        # 10 admitted + the overflow series: edge-proxy's, and this process's own scrapes.
        assert total(s, "probewire_active_series",
                     metric="http_server_request_duration_seconds") <= 12


@pytest.fixture(scope="module")
def tls_stack() -> Iterator[tuple[int, int]]:
    """(nginx HTTPS port, upstream port)."""
    with python_upstream() as up, nginx(upstream_port=up.port, tls=True) as ng:
        yield ng.port, up.port


def test_https_through_openssl_uprobes_counted_on_both_sides(agent, tls_stack) -> None:
    """nginx with TLS, curl --http1.1 and Python's ssl module (both libssl.so.3) as clients."""
    import ssl

    a, listen = agent
    ng, up = tls_stack
    http_probe = a.probes["l7"]
    assert isinstance(http_probe, L7Probe)
    assert http_probe.tls is not None and http_probe.tls.attached, http_probe.tls
    d = Delta(listen)
    for _ in range(3):
        out = subprocess.run(["curl", "-sk", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}",
                              f"https://127.0.0.1:{ng}/static/index.html"],
                             capture_output=True, text=True, timeout=10)
        assert out.stdout == "200"
    conn = http.client.HTTPSConnection("127.0.0.1", ng, timeout=10,
                                       context=ssl._create_unverified_context())
    for path, status in (("/api/tls/1", 200), ("/missing", 404), ("/api/fail", 503)):
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == status
    conn.close()
    d.settle(SERVER, 6, service_name="nginx", url_scheme="https")
    https = {"url_scheme": "https"}
    assert server(d, "nginx", "GET", "/static/index.html", 200) == 3
    assert d(SERVER, service_name="nginx", http_route="/static/index.html", **https) == 3
    assert d(SERVER, service_name="nginx", http_route="/api/tls/{id}",
             http_response_status_code="200", **https) == 1
    assert d(SERVER, service_name="nginx", http_route="/missing",
             http_response_status_code="404", **https) == 1
    assert d(SERVER, service_name="nginx", http_route="/api/fail",
             http_response_status_code="503", **https) == 1
    assert d(SERVER, service_name="nginx", **https) == 6
    # Nothing of the ciphertext was taken for plain HTTP.
    assert d(SERVER, service_name="nginx", url_scheme="http") == 0
    assert d(CLIENT, service_name="curl", server_port=str(ng), **https) == 3
    assert d(CLIENT, service_name="pytest", server_port=str(ng), **https) == 3
    # nginx -> upstream stays plain HTTP.
    assert d(CLIENT, service_name="nginx", server_port=str(up), url_scheme="http") == 2
    coverage = {c.pid: c for c in http_probe.tls.coverage()}
    nginx_pids = [c for c in coverage.values() if c.comm == "nginx"]
    assert nginx_pids and all(c.covered for c in nginx_pids)
